# The course's model size (about 45M parameters) with the tokenizer trained on the corpus: its
# 8192-row embedding is 5.2M parameters where GPT-2's is 25.8M, and the 20M it frees go to the
# transformer (8 layers, 640 wide, 10 heads of 64, against 6 x 512); each 256-token block holds
# about 2.6 times as much text. One CUDA GPU, 32 x 256 tokens a step.
#   python data/train_tokenizer.py --input="data/wiki/wiki-zh-subset-*.jsonl" --out_path=data/tokenizer/wiki.tiktoken
#   python data/prepare.py --tokenizer=data/tokenizer/wiki.tiktoken --input="data/wiki/wiki-zh-subset-*.jsonl"
#       (or both without the flags: the default corpus and its zh tokenizer)
#   python train.py config/train_config_zh.py
#   torchrun --standalone --nproc_per_node=4 train.py config/train_config_zh.py   (several GPUs)
out_dir = "out-zh"
data_dir = "data/processed_pretrain"
tokenizer = "zh"          # with a wiki tokenizer: --tokenizer=data/tokenizer/wiki.tiktoken
n_layer = 8
n_head = 10
n_embd = 640
dropout = 0.0
batch_size = 32
gradient_accumulation_steps = 4
max_iters = 20000
lr_decay_iters = 20000
warmup_iters = 500
learning_rate = 6e-4
min_lr = 6e-5
eval_interval = 500
eval_iters = 100
log_interval = 20
compile = True
expect_cuda = True

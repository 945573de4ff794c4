# The course's model on one CUDA GPU: 6 layers, 512 wide, 8 heads, GPT-2's tokenizer (about 45M
# parameters, 25.8M of them the 50304-row embedding), block_size 256 from the prepared data,
# 32 x 256 tokens a step. config/train_config_zh.py is the same size with the corpus tokenizer.
#   python data/prepare.py --tokenizer=gpt2 --out_dir=data/processed_pretrain_gpt2 \
#       --input="data/wiki/wiki-zh-subset-*.jsonl"   (or without --input: the default corpus)
#   python train.py config/train_config.py
#   torchrun --standalone --nproc_per_node=4 train.py config/train_config.py   (several GPUs)
out_dir = "out"
data_dir = "data/processed_pretrain_gpt2"
tokenizer = "gpt2"
n_layer = 6
n_head = 8
n_embd = 512
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

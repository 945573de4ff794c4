# Supervised fine-tuning of config/train_config_zh.py's model on question/answer pairs. With the
# corpus tokenizer a pair is about 41 tokens (99.9% fit in 128); prepare_sft.py packs about three a
# block of 128, so 3000 steps of 32 blocks are about 2.8 epochs of the default data.
#   python data/prepare_sft.py --block_size=128 [--input=my_sft.json --tokenizer=<the pretraining data's>]
#   python train.py config/train_config_zh_sft.py
out_dir = "out-zh-sft"
data_dir = "data/processed_sft"
tokenizer = "zh"          # with a wiki tokenizer: --tokenizer=data/tokenizer/wiki.tiktoken
init_from = "pretrained"
init_checkpoint = "out-zh"
batch_size = 32
gradient_accumulation_steps = 1
max_iters = 3000
lr_decay_iters = 3000
warmup_iters = 100
learning_rate = 1e-4
min_lr = 1e-5
eval_interval = 250
eval_iters = 50
log_interval = 20
compile = True
expect_cuda = True

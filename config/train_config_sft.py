# Supervised fine-tuning of the course model (config/train_config.py) on question/answer pairs.
#   python data/prepare_sft.py --tokenizer=gpt2 --out_dir=data/processed_sft_gpt2 [--input=my_sft.json]
#   python train.py config/train_config_sft.py
# prepare_sft.py packs about 2.5 pairs a block here, so 3000 steps of 32 blocks are about 2.4 epochs
# of the default data (one pair a block, --pack=False: about one epoch).
out_dir = "out-sft"
data_dir = "data/processed_sft_gpt2"
tokenizer = "gpt2"
init_from = "pretrained"
init_checkpoint = "out"
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

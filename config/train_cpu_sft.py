# SFT on a laptop CPU from config/train_cpu.py's model, in under 2 minutes (127 ms a step here on
# blocks of 128 tokens: python data/prepare_sft.py --block_size=128, which every pair of the
# default data but 0.1% fits with the zh tokenizer, packed about three a block; 800 steps of 8
# blocks are about 19% of an epoch). make demo runs it.
#   python train.py config/train_cpu_sft.py
out_dir = "out-cpu-sft"
data_dir = "data/processed_sft"
init_from = "pretrained"
init_checkpoint = "out-cpu"
batch_size = 8
max_iters = 800
lr_decay_iters = 800
warmup_iters = 20
learning_rate = 1e-3
min_lr = 1e-4
eval_interval = 200
eval_iters = 5            # 5 batches of train and of val per evaluation: keeps make demo under 15 minutes
log_interval = 50

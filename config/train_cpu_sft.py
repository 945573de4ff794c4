# SFT on a laptop CPU from config/train_cpu.py's model, in a few minutes. make demo runs it.
#   python train.py config/train_cpu_sft.py
out_dir = "out-cpu-sft"
data_dir = "data/processed_sft"
init_from = "pretrained"
init_checkpoint = "out-cpu"
batch_size = 8
max_iters = 200
lr_decay_iters = 200
warmup_iters = 10
learning_rate = 1e-3
min_lr = 1e-4
eval_interval = 50
eval_iters = 5            # 5 batches of train and of val per evaluation: keeps make demo under 15 minutes
log_interval = 20

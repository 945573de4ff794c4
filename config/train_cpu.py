# Pretraining on a laptop CPU (2 cores): a small model that learns the shape of classical poems
# from the default corpus in about 9 minutes. make demo runs it.
#   python train.py config/train_cpu.py
out_dir = "out-cpu"
data_dir = "data/processed_pretrain"
n_layer = 4
n_head = 4
n_embd = 192
dropout = 0.0
batch_size = 8
gradient_accumulation_steps = 1
max_iters = 400
lr_decay_iters = 400
warmup_iters = 20
learning_rate = 2e-3
min_lr = 2e-4
eval_interval = 100
eval_iters = 5            # 5 batches of train and of val per evaluation: keeps make demo under 15 minutes
log_interval = 20

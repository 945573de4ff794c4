# Pretraining on a laptop CPU (2 cores): a small model that learns the shape of classical poems
# and the words of the default corpus in about 8.5 minutes (420 ms a step here). make demo runs it.
#   python data/train_tokenizer.py && python data/prepare.py     (the zh tokenizer's data)
#   python train.py config/train_cpu.py
# The recipe, measured on the zh tokenizer's data at equal time (README: the tokenizer race):
# 3.4M parameters, 1200 steps. A zh step costs 1/3 of a GPT-2-tokenizer step of the same shape,
# and the freed time goes to steps: 6 layers x 256 wide for the same time (751 steps against
# 1360) ended at val loss 6.79 against 6.44, and learning rates 3e-3 and 4e-3 were behind 2e-3
# after 400 of 1360 steps (training loss 6.84 and 7.01 against 6.76).
out_dir = "out-cpu"
data_dir = "data/processed_pretrain"
n_layer = 4
n_head = 4
n_embd = 192
dropout = 0.0
batch_size = 8
gradient_accumulation_steps = 1
max_iters = 1200
lr_decay_iters = 1200
warmup_iters = 20
learning_rate = 2e-3
min_lr = 2e-4
eval_interval = 200
eval_iters = 5            # 5 batches of train and of val per evaluation: keeps make demo under 15 minutes
log_interval = 50

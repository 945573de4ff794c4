# LoRA SFT on a laptop CPU: config/train_cpu_sft.py's data, batch, steps and schedule, from the same
# pretrained model (out-cpu), but only rank-8 adapters on every Linear layer of each block train
# (lora.py, peft); out-cpu stays as it is and the checkpoint holds the adapters (its path and sha256
# name the base). Learning rate: after 200 of these steps (out-cpu of make demo, this machine), val
# loss 6.187 at 1e-3, 6.067 at 3e-3, 6.083 at 1e-2 (full SFT at its 1e-3: 5.830).
# The comparison with full SFT (README "LoRA"): python bench.py --only=lora
#   python train.py config/train_cpu_lora.py
#   python train.py config/train_cpu_lora.py --lora_rank=64 --lora_alpha=128 --out_dir=out-cpu-lora64
#   python train.py config/train_cpu_lora.py --train_embeddings=True --out_dir=out-cpu-lora-emb
#   python sample.py --out_dir=out-cpu-lora              # loads out-cpu and merges the adapters into it
out_dir = "out-cpu-lora"
data_dir = "data/processed_sft"
init_from = "pretrained"
init_checkpoint = "out-cpu"
lora_rank = 8
lora_alpha = 16.0         # the adapters' scale lora_alpha / lora_rank = 2; keep it when changing the rank
lora_dropout = 0.0        # 0.05 cost 38 ms a step here (random numbers for 5.5M activations a step on the CPU):
                          # LoRA took 172 ms a step against full SFT's 149, without it 134 (taking turns in one process)
batch_size = 8
max_iters = 800
lr_decay_iters = 800
warmup_iters = 20
learning_rate = 3e-3
min_lr = 3e-4
eval_interval = 200
eval_iters = 5
log_interval = 50

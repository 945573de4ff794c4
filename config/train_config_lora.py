# LoRA SFT of the course model (config/train_config.py's out/) on one CUDA GPU: the data, batch and
# steps of config/train_config_sft.py, rank-8 adapters on every Linear layer of each block; the base
# stays frozen in out/ and out-lora/ckpt.pt holds the adapters (a few MB: README "LoRA").
# The learning rate is ten times full SFT's (LoRA's usual higher rate; on the CPU demo the sweep in
# config/train_cpu_lora.py chose three times); lora_dropout 0.05 as ChatGLM's LoRA. Neither was
# measured on a GPU here.
#   python train.py config/train_config_lora.py
#   python train.py config/train_config_lora.py --train_embeddings=True   # also the embedding matrix
#   python sample.py --out_dir=out-lora --merge_to=out-lora-merged       # one standalone checkpoint
out_dir = "out-lora"
data_dir = "data/processed_sft_gpt2"
tokenizer = "gpt2"
init_from = "pretrained"
init_checkpoint = "out"
lora_rank = 8
lora_alpha = 16.0
lora_dropout = 0.05
batch_size = 32
gradient_accumulation_steps = 1
max_iters = 3000
lr_decay_iters = 3000
warmup_iters = 100
learning_rate = 1e-3
min_lr = 1e-4
eval_interval = 250
eval_iters = 50
log_interval = 20
compile = True
expect_cuda = True

#!/usr/bin/env bash
# GPU check of the training path, for a machine with one CUDA GPU (about 500 s on an H100 before the Qwen2
# runs were added, which have not run on a GPU yet: benchmarks/RESULTS.md §7, §7b).
#
# A ~1.4B-parameter LLaVA with random weights (TinyLlama-shaped LLM: hidden 2048, 22 layers, GQA 32/4,
# vocab 32000; CLIP-ViT-L/14-336 tower, 576 image tokens; mlp2x_gelu projector) in bf16 with sdpa runs
#   stage 1 (pretrain: projector only), stage 2 full (finetune), stage 2 LoRA (r 128)
# each under DeepSpeed ZeRO-2 and ZeRO-3 on ONE GPU (torchrun --nproc_per_node 1), 10 optimizer steps of
# 8 samples, the first 3 not timed. Prints per run: step time, samples/s, tokens/s, peak GPU memory and
# MFU (model FLOPs / step time / this GPU's bf16 matmul rate measured first; PEAK_TFLOPS=... overrides),
# then the packed step (benchmarks/gpu_packed.py: packed == unpacked, packed vs unpacked speed).
# Before the packed step, a ~1.9B OneVision-shaped LLaVA with random weights (Qwen2-1.5B-shaped LLM:
# hidden 1536, 28 layers, GQA 12/2, intermediate 8960, vocab 151936, tied embeddings; SigLIP-so400m/14-384
# tower, 27 layers as released with the last dropped, 729 tokens per crop; anyres_max_9) runs stage 1 and
# stage 2 LoRA under ZeRO-2, same settings (benchmarks/RESULTS.md §7b).
#
#   bash benchmarks/gpu_check.sh [out_dir]          # results: <out_dir>/summary.json (+ one JSON per run)
#   GPU_CHECK_ONLY="zero2:finetune" bash benchmarks/gpu_check.sh     # a subset
#   GPU_CHECK_QWEN2_ONLY="" bash benchmarks/gpu_check.sh             # skip the Qwen2 + SigLIP runs
#   GPU_CHECK_ONLY="" bash benchmarks/gpu_check.sh                   # the Qwen2 + SigLIP runs only (and packing)
#   GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh                 # same path on CPU, tiny models, fp32
#
# Not run in this repository's CI (no GPU there); the dry run checks the script itself on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${1:-benchmarks/out/gpu_check}
DRY=${GPU_CHECK_DRY_RUN:-0}
ONLY=${GPU_CHECK_ONLY-"zero2:pretrain zero2:finetune zero2:finetune_lora zero3:pretrain zero3:finetune zero3:finetune_lora"}
QWEN2_ONLY=${GPU_CHECK_QWEN2_ONLY-"zero2:pretrain zero2:finetune_lora"}
mkdir -p "$OUT"
export WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
START=$(date +%s)

if [ "$DRY" != 1 ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU: use GPU_CHECK_DRY_RUN=1 on CPU'"
  # 0. The MFU denominator: this GPU's dense bf16 matmul rate, measured here (8192^3 GEMMs).
  MEASURED_TFLOPS=$($PY -c "
import time, torch
a, b = (torch.randn(8192, 8192, device='cuda', dtype=torch.bfloat16) for _ in range(2))
[a @ b for _ in range(3)]; torch.cuda.synchronize(); t = time.perf_counter()
[a @ b for _ in range(20)]; torch.cuda.synchronize()
print(round(20 * 2 * 8192**3 / (time.perf_counter() - t) / 1e12, 1))")
  export MEASURED_TFLOPS
  echo "measured bf16 matmul: $MEASURED_TFLOPS TFLOP/s (MFU denominator unless PEAK_TFLOPS is set)"
fi

# 1. Synthetic data: one 336x336 image (56x56 in the dry run) and a ~120-token answer per sample.
$PY - "$OUT" "$DRY" <<'EOF'
import json, random, sys
from pathlib import Path
from PIL import Image
out, dry = Path(sys.argv[1]), sys.argv[2] == "1"
side = 56 if dry else 336
(out / "images").mkdir(parents=True, exist_ok=True)
rng = random.Random(0)
words = "the a digit image shows colour shape left right top bottom small large bright dark line".split()
records = []
for i in range(64):
    Image.new("RGB", (side, side), tuple(rng.randrange(256) for _ in range(3))).save(out / "images" / f"{i}.png")
    answer = " ".join(rng.choice(words) for _ in range(90))
    records.append({"id": str(i), "image": f"{i}.png", "conversations": [
        {"from": "human", "value": "<image>\nDescribe the image in detail."}, {"from": "gpt", "value": answer}]})
(out / "train.json").write_text(json.dumps(records))
EOF

# 2. The per-run driver: the launcher's steps plus a timing callback.
cat > "$OUT/driver.py" <<'EOF'
import json, os, sys, time
from pathlib import Path
import torch
from hydra import compose, initialize_config_dir
from transformers import TrainerCallback
from llava_train.config import CONF_DIR, normalize_argv, register_configs, to_typed
from llava_train.train import steps
from llava_train.train.stages import apply_stage
from llava_train.train.throughput import PEAK_TFLOPS_16BIT

WARMUP = 3

def numel(p):  # ZeRO-3 partitions parameters (shape [0] outside a gather); ds_numel is the full size
    return getattr(p, "ds_numel", None) or p.numel()

class Timer(TrainerCallback):
    def __init__(self):
        self.times, self.t0 = [], None
    def _sync(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    def on_step_begin(self, args, state, control, **kw):
        self._sync(); self.t0 = time.perf_counter()
    def on_step_end(self, args, state, control, **kw):
        self._sync(); self.times.append(time.perf_counter() - self.t0)
        if state.global_step == WARMUP and torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

def flops_per_sample(model, stage, seq, n_img_tokens):
    """fwd 2*N*T (+ causal attention) per part; backward: 2x fwd where weights train, 1x (activation grads)
    for frozen LLM weights the gradient still flows through; the tower (before the projector) is fwd only."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = base.config
    llm = sum(numel(p) for n, p in base.named_parameters() if not n.startswith(("model.vision_tower", "model.embed_tokens", "model.mm_projector")))
    if cfg.tie_word_embeddings:  # the LM head is the embedding, which named_parameters lists once, as embed_tokens
        llm += numel(base.get_output_embeddings().weight)
    tower = sum(numel(p) for n, p in base.named_parameters() if n.startswith("model.vision_tower"))
    attn = 2 * cfg.num_hidden_layers * seq * seq * cfg.hidden_size  # causal QK^T + AV, fwd
    fwd = 2 * llm * seq + attn
    bwd = 2 * fwd if stage == "finetune" else fwd
    return fwd + bwd + 2 * tower * (n_img_tokens + 1)

def describe(model):
    """The built model in one line: LLM family and size, then the tower's (read from the model, not the config group)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg, tower = base.config, base.get_vision_tower()
    return (f"{cfg.model_type} {cfg.hidden_size}x{cfg.num_hidden_layers} + {tower.config.model_type.split('_')[0]} "
            f"{tower.config.hidden_size}x{tower.config.num_hidden_layers} @{tower.image_size}")

def main():
    stage, overrides = sys.argv[1], sys.argv[2:]
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        raw = compose("config", overrides=normalize_argv([f"stage={stage}", *overrides]))
    cfg = to_typed(raw)
    steps.setup_run(cfg, raw)
    tokenizer = steps.build_tokenizer(cfg)
    t0 = time.perf_counter()
    model = apply_stage(steps.build_model(cfg, tokenizer), cfg.stage)
    build_s = time.perf_counter() - t0
    dataset, collator = steps.build_data(cfg, tokenizer, model)
    trainer = steps.build_trainer(cfg, model, tokenizer, dataset, collator)
    timer = Timer()
    trainer.add_callback(timer)
    steps.train(trainer, cfg)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    seq = int(dataset[0]["length"])
    n_img = seq - len(dataset[0]["input_ids"]) + 1
    step_s = sum(timer.times[WARMUP:]) / max(len(timer.times) - WARMUP, 1)
    samples = cfg.training.global_batch_size
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    rate = os.environ.get("PEAK_TFLOPS") or os.environ.get("MEASURED_TFLOPS")
    peak = float(rate) * 1e12 if rate else next((v * 1e12 for k, v in PEAK_TFLOPS_16BIT.items() if k in name), None)
    achieved = flops_per_sample(trainer.model, stage, seq, n_img) * samples / step_s
    result = {
        "stage": stage, "deepspeed": cfg.deepspeed.name, "device": name, "model": describe(trainer.model),
        "params_total": sum(numel(p) for p in trainer.model.parameters()),
        "params_trainable": sum(numel(p) for p in trainer.model.parameters() if p.requires_grad),
        "tokens_per_sample": seq, "samples_per_step": samples, "model_build_s": round(build_s, 1),
        "step_s": round(step_s, 4), "samples_per_s": round(samples / step_s, 2), "tokens_per_s": round(samples * seq / step_s),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
        "mfu": round(achieved / peak, 4) if peak else None,
        "final_loss": next((h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h), None),
    }
    Path(cfg.training.run_dir, "result.json").write_text(json.dumps(result, indent=1))
    print("RESULT", json.dumps(result))

if __name__ == "__main__":
    main()
EOF

# 3. The runs. The Qwen2 model is the OneVision config group with a random LLM and tower; the mistral
# tokenizer (offline) encodes the text, the 151936-row embedding keeps Qwen2-1.5B's size (ids < 32000).
QWEN2=(model=llava_onevision_qwen2_7b model.llm_path=null model.vision_tower=null tokenizer=mistral
       data.template=vicuna_v1 +model.extra.tie_word_embeddings=true)
if [ "$DRY" = 1 ]; then
  MODEL=(model=tiny data.image_aspect_ratio=pad)
  # the same config group and overrides at tiny sizes (SigLIP: 3 layers as released, 2 kept; 56 px;
  # the mistral vocab: 151936 rows make a CPU step 10x slower and check nothing more)
  QWEN2+=(+model.extra.vocab_size=32000 model.hidden_size=128 model.intermediate_size=344 model.num_hidden_layers=2
          model.num_attention_heads=4 model.num_key_value_heads=2
          +model.vision_config.hidden_size=64 +model.vision_config.intermediate_size=128
          +model.vision_config.num_hidden_layers=3 +model.vision_config.num_attention_heads=2
          +model.vision_config.image_size=56)
  TRAIN=(training.precision=fp32 training.per_device_batch_size=2 training.global_batch_size=2 training.max_steps=5)
else
  MODEL=(model=llava_v15_vicuna7b model.llm_path=null model.vision_tower=null tokenizer=mistral
         model.hidden_size=2048 model.intermediate_size=5632 model.num_hidden_layers=22
         model.num_attention_heads=32 model.num_key_value_heads=4 model.dtype=bfloat16 model.attn_implementation=sdpa)
  QWEN2+=(+model.extra.vocab_size=151936 model.hidden_size=1536 model.intermediate_size=8960 model.num_hidden_layers=28
          model.num_attention_heads=12 model.num_key_value_heads=2 model.dtype=bfloat16 model.attn_implementation=sdpa)
  TRAIN=(training.precision=bf16 training.per_device_batch_size=8 training.global_batch_size=8 training.max_steps=10)
fi
COMMON=(data.data_path="$OUT/train.json" data.image_folder="$OUT/images" data.num_workers=2 data.group_by_modality_length=false
        stage.pretrain_mm_mlp_adapter=null training.gradient_checkpointing=false training.save_steps=100000
        training.logging_steps=1 training.progress_bar=false training.loss_plot=false training.report_to_wandb=false
        training.warmup_ratio=0 training.lr_scheduler_type=constant)
port=29600
run_all() {  # run_all <run-dir prefix> <"zero:stage ..."> <model overrides...>
  local prefix=$1 runs=$2; shift 2
  for run in $runs; do
    zero=${run%%:*}; stage=${run##*:}; port=$((port + 1)); dir=$prefix$zero-$stage
    echo "=== $prefix$stage / $zero ($(( $(date +%s) - START )) s elapsed)"
    rm -rf "${OUT:?}/$dir"
    timeout 150 $PY -m torch.distributed.run --nproc_per_node 1 --master_port $port "$OUT/driver.py" "$stage" \
      "$@" "${COMMON[@]}" "${TRAIN[@]}" deepspeed=$zero training.run_dir="$OUT/$dir" \
      > "$OUT/$dir.log" 2>&1 || { echo "FAILED (log: $OUT/$dir.log)"; tail -20 "$OUT/$dir.log"; continue; }
    grep '^RESULT' "$OUT/$dir.log" | sed 's/^RESULT //'
  done
}
run_all "" "$ONLY" "${MODEL[@]}"
run_all qwen2- "$QWEN2_ONLY" "${QWEN2[@]}"

# 4. Packing: packed == unpacked (loss, grad norm) and packed vs unpacked step speed, per attention impl.
if [ "$DRY" = 1 ]; then PACK=(--device cpu --dtype float32 --samples 8); else PACK=(--device cuda --dtype bfloat16); fi
timeout 150 $PY benchmarks/gpu_packed.py "${PACK[@]}" --out "$OUT/packed.json" || echo "PACKED CHECK FAILED"

# 5. Summary table.
$PY - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = [json.loads(p.read_text()) for p in sorted(out.glob("*/result.json"))]
(out / "summary.json").write_text(json.dumps(rows, indent=1))
print(f"{'model':<40}{'stage':<14}{'zero':<7}{'params':>8}{'train':>8}{'step s':>8}{'smp/s':>8}{'tok/s':>9}{'peak GiB':>9}{'MFU':>7}")
for r in rows:
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
    mem = r["peak_mem_gib"] if r["peak_mem_gib"] is not None else "n/a"
    print(f"{r.get('model', ''):<40}{r['stage']:<14}{r['deepspeed']:<7}{r['params_total'] / 1e9:>7.2f}B{r['params_trainable'] / 1e6:>7.0f}M"
          f"{r['step_s']:>8.3f}{r['samples_per_s']:>8.1f}{r['tokens_per_s']:>9}{mem:>9}{mfu:>7}")
EOF
echo "gpu_check: $(( $(date +%s) - START )) s total; results in $OUT/summary.json"

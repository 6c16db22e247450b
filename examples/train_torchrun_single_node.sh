#!/usr/bin/env bash
# Train on one machine with several GPUs: torchrun starts one mriseg process per GPU, and
# mriseg trains with DistributedDataParallel over NCCL. Only rank 0 writes the run folder.
#
#   examples/train_torchrun_single_node.sh CACHE RUN_DIR [more `mriseg train` options]
#   NGPUS=2 examples/train_torchrun_single_node.sh cache/lgg runs/lgg --model unet --epochs 50
#
# CACHE    a cache written by `mriseg preprocess` (a raw dataset works too: rank 0
#          preprocesses it into RUN_DIR/cache first, the other ranks wait)
# RUN_DIR  the run folder. When it already holds last.pt (Ctrl-C or SIGTERM to torchrun make
#          the workers finish their step and write it, as does the end of each epoch), running
#          the same command again resumes it with `--resume`: the resumed run keeps the
#          settings in RUN_DIR/config.json; only --epochs, --patience, --device, --workers,
#          --amp, --compile and --log-every may change (mriseg warns about the others).
# NGPUS    processes to start (default: every GPU PyTorch sees, so CUDA_VISIBLE_DEVICES=0,1
#          limits it to two).
#
# To adapt: add options after RUN_DIR (`mriseg train --help` lists them). --batch-size is per
# process, so the effective batch is NGPUS times larger than on one GPU; scale --lr if needed.
set -euo pipefail

if (( $# < 2 )); then
    echo "usage: $0 CACHE RUN_DIR [mriseg train options]" >&2
    exit 2
fi
cache=$1
run_dir=$2
shift 2

ngpus=${NGPUS:-$(python3 -c 'import torch; print(torch.cuda.device_count())')}
if (( ngpus < 1 )); then
    echo "$0: no CUDA GPU visible; on CPU run \`mriseg train $cache --out $run_dir\` instead" >&2
    exit 2
fi

if [[ -f "$run_dir/last.pt" ]]; then
    echo "$run_dir holds last.pt: resuming it" >&2
    data_and_run=(--resume --out "$run_dir")
else
    data_and_run=("$cache" --out "$run_dir")
fi

exec torchrun --standalone --nproc_per_node "$ngpus" \
    -m mriseg train "${data_and_run[@]}" --device cuda --amp "$@"

#!/usr/bin/env bash
# Segment every NIfTI scan under a folder and print one line per case: case id and tumour
# volume, or FAILED and why. A plain pipeline: `find` lists the scans, `mriseg predict -` reads
# them from stdin and prints one JSON line per case on stdout (its progress and errors go to
# stderr), and a few lines of python3 (no jq needed) turn the JSON into a table.
#
#   examples/predict_pipeline.sh SCANS MODEL OUT > volumes.tsv
#
# SCANS  a folder searched for *.nii.gz files; each file is one scan holding every channel the
#        model needs (e.g. MSD-style 4D NIfTI, channels in the model's order)
# MODEL  a run folder (its best.pt is used) or a .pt checkpoint
# OUT    the output folder for <case>_seg.nii.gz; existing outputs are refused, not replaced
#        (add --overwrite to the mriseg line to replace them)
#
# Output: tab-separated `case_id  volume_ml` per case on stdout, `case_id  FAILED  error` for a
# case that could not be done, and the counts on stderr. The exit code is mriseg's: 0 when all
# cases were done, 1 when some failed, 2 when none could be done.
#
# To adapt: BraTS-style case folders (one NIfTI per modality) are inputs too; list the
# folders instead of the files: find "$scans" -mindepth 1 -maxdepth 1 -type d. Options such
# as --tta, --largest-component or --device cuda go on the mriseg line.
set -euo pipefail

if (( $# != 3 )); then
    echo "usage: $0 SCANS MODEL OUT" >&2
    exit 2
fi
scans=$1
model=$2
out=$3

find "$scans" -name '*.nii.gz' | sort \
    | mriseg predict - --json --model "$model" --out "$out" \
    | python3 -c '
import json
import sys

done = failed = 0
for line in sys.stdin:
    case = json.loads(line)
    if case["status"] == "ok":
        done += 1
        print(case["case_id"], format(case["volume_ml"], ".2f"), sep="\t")
    else:
        failed += 1
        print(case["case_id"], "FAILED", case["error"], sep="\t")
print(f"{done} case(s) segmented, {failed} failed", file=sys.stderr)
'

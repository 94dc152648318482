#!/usr/bin/env bash
# Caption a corpus on a SLURM cluster with no coordinator: an array job runs one share per task
# (`--num-shards N --shard-index $SLURM_ARRAY_TASK_ID`), each into its own output and state, and a
# merge job that starts once every task succeeded joins the shares into one output.
#
#   sbatch examples/slurm.sh            # submits the array and the merge; prints both job ids
#
# A task that fails or hits its time limit is simply submitted again (same command): it resumes its
# own share. A task exits 0 only when its share is complete: one that stopped at --max-runtime or left
# transient work (`unavailable` rows from a store answering 503, shards not read to the end) exits 3,
# so `afterok` holds the merge back until a resubmitted task finishes the share. The shares are chosen by a stable hash of each shard or image, so they stay the same
# however the inputs are listed, and no two tasks ever caption the same image.
set -euo pipefail

SHARES=${SHARES:-8}                                      # array size = number of shares
INPUTS=${INPUTS:-'/data/laion/{00000..00999}.tar'}       # folders, shards, manifests, @lists
OUT=${OUT:-/shared/caps}                                 # shared storage (or s3://bucket/caps)
MODEL=${MODEL:-internlm/CapRL-3B}

if [[ -z "${SLURM_JOB_ID:-}" ]]; then
    # Submitting: the array of shares, then the merge, which waits for all of them to succeed.
    array=$(sbatch --parsable --job-name=caprl-share --array="0-$((SHARES - 1))" \
        --gres=gpu:1 --cpus-per-task=8 --time=12:00:00 \
        --export=ALL,SHARES="$SHARES",INPUTS="$INPUTS",OUT="$OUT",MODEL="$MODEL",STEP=share "$0")
    merge=$(sbatch --parsable --job-name=caprl-merge --dependency="afterok:${array}" \
        --cpus-per-task=2 --time=2:00:00 \
        --export=ALL,SHARES="$SHARES",OUT="$OUT",STEP=merge "$0")
    echo "shares: job ${array} (${SHARES} tasks); merge: job ${merge}"
    exit 0
fi

case "${STEP:-share}" in
share)
    # One share; its output and state are its own, so tasks never wait on each other's lock.
    # --max-runtime stops cleanly before SLURM's time limit. Exit 3 (partial: time ran out, or transient
    # failures left work) is requeued, so the same task continues its share.
    # shellcheck disable=SC2086  # INPUTS may hold several inputs
    code=0
    caprl caption $INPUTS -o "${OUT}/share-{shard_index}.parquet" \
        --num-shards "$SHARES" --shard-index "$SLURM_ARRAY_TASK_ID" \
        --model "$MODEL" --max-runtime 11h45m --no-progress || code=$?
    if [[ $code == 3 ]]; then
        scontrol requeue "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
    fi
    exit "$code"
    ;;
merge)
    parts=()
    for ((i = 0; i < SHARES; i++)); do parts+=("${OUT}/share-${i}.parquet"); done
    caprl merge "${parts[@]}" -o "${OUT}/captions.parquet"
    ;;
esac

#!/usr/bin/env bash
# Hourly cron job: caption whatever arrived under $IMAGES since the last run.
#
#   crontab -e
#   0 * * * * IMAGES=/data/incoming OUTPUT=/data/captions/incoming.parquet /opt/caprl/examples/cron.sh >> /var/log/caprl.log 2>&1
#
# Every run resumes the last one: images already in the output are skipped, new ones are added.
# --max-runtime keeps each run inside its hour; a run still going when the next starts makes the
# newcomer exit 75 at once instead of competing for the GPUs.
set -u
IMAGES=${IMAGES:?set IMAGES to the folder to caption}
OUTPUT=${OUTPUT:?set OUTPUT to the output file (.parquet or .jsonl)}

caprl caption "$IMAGES" -o "$OUTPUT" --max-runtime 55m --no-progress
code=$?
case $code in
  0) echo "$(date -Is) caprl: complete" ;;
  3) echo "$(date -Is) caprl: partial (time limit, or a server or store failing for now), the next run continues" ;;
  75) echo "$(date -Is) caprl: the previous run is still going, skipped" ;;
  130|143) echo "$(date -Is) caprl: interrupted, the next run resumes" ;;
  *) echo "$(date -Is) caprl: failed with exit code $code"; exit "$code" ;;
esac
caprl status "$OUTPUT" "$IMAGES"

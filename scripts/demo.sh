#!/usr/bin/env bash
# `make demo`: the whole system on the embedded default (tiny profile, a synthetic session), offline on CPU.
# Every step writes under $OUT (default runs/demo); weights go to $OUT/weights, never elsewhere.
set -euo pipefail
OUT=${1:-runs/demo}
CLI=${CLI:-.venv/bin/spikevaediff}
VDVAE_MINUTES=${VDVAE_MINUTES:-3}
LIVE_SECONDS=${LIVE_SECONDS:-20}
WEIGHTS="$OUT/weights"
SESSION="$OUT/session.nwb"
mkdir -p "$OUT"
step() { printf '\n== %s\n' "$*"; }

step "1/7 simulate a session in the Allen layout"
[ -f "$SESSION" ] || "$CLI" simulate --out "$SESSION" --seed 0

step "2/7 inspect it and draw its PSTH per area"
"$CLI" inspect "$SESSION"
"$CLI" psth "$SESSION" --movie natural_movie_one --out "$OUT/psth.png"

step "3/7 build the tiny offline CLIP, BLIP-2 and Versatile Diffusion"
"$CLI" models init-tiny --weights "$WEIGHTS"

step "4/7 train the tiny VDVAE on the session's other movie (natural_movie_three), ${VDVAE_MINUTES} min"
[ -f "$WEIGHTS/vdvae-tiny/vdvae.th" ] || \
  "$CLI" train-vdvae --frames "$SESSION" --movie natural_movie_three --out "$WEIGHTS/vdvae-tiny" \
    --minutes "$VDVAE_MINUTES"

step "5/7 fit the ridges (spikes -> VDVAE latents, CLIP-Vision, CLIP-Text) into a bundle"
rm -rf "$OUT/bundle"
"$CLI" train "$SESSION" --movie natural_movie_one --profile tiny --weights "$WEIGHTS" --out "$OUT/bundle"

step "6/7 evaluate on held-out repeats: metrics beside chance and shuffled spikes"
"$CLI" evaluate "$OUT/bundle" "$SESSION" --out "$OUT/report"

if "$CLI" run --help >/dev/null 2>&1; then
  step "7/7 decode the session live at real-time speed (${LIVE_SECONDS} s)"
  "$CLI" run --session "$SESSION" --bundle "$OUT/bundle" --out "$OUT/live" --speed 1 --duration "$LIVE_SECONDS"
fi

printf '\ndemo done: report %s/report/report.md, figures in %s\n' "$OUT" "$OUT"

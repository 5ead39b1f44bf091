#!/usr/bin/env bash
# Re-makes the README's pictures in docs/ from the demo's outputs. Run after `dvc repro`.
#   bash docs/make_pictures.sh
set -euo pipefail
cd "$(dirname "$0")/.."
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

# predict: three test faces enlarged to 128×128 (predict takes any size; features at the
# model's 32×32, masks resized back to 128×128).
mkdir -p "$scratch/faces"
python - "$scratch/faces" <<'EOF'
import sys
from pathlib import Path
from PIL import Image
out = Path(sys.argv[1])
for name in ("face_0000", "face_0001", "face_0002"):
    image = Image.open(f"data/demo/real/test/{name}.png")
    image.resize((128, 128), Image.Resampling.BICUBIC).save(out / f"{name}.png")
EOF
rm -rf docs/predict
python cli.py --quiet predict --ensemble data/models/ensemble-ddpm --checkpoint data/checkpoints/demo_ddpm \
    --images "$scratch/faces" --out "$scratch/predict" --pictures 3
mkdir -p docs/predict
cp "$scratch/predict/predictions.png" docs/predict/
cp "$scratch/faces/face_0001.png" docs/predict/
cp "$scratch/predict/face_0001_mask.png" "$scratch/predict/face_0001_overlay.png" \
    "$scratch/predict/face_0001_uncertainty.png" docs/predict/

# inspect: what the features look like, no model needed.
python cli.py --quiet inspect --store data/stores/ddpm-test.zarr --image 1 --pca docs/pca.png
python cli.py --quiet inspect --store data/stores/ddpm-test.zarr --image 1 --similarity 14 12 docs/similarity.png \
    --compare-with face_0002 --compare-with face_0003

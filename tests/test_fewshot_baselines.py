"""The few-shot baselines: prototype matching and the MLP ensemble on the supports, exact on
hand-made features and scored on the same episodes as DiffewS."""

import json

import torch

from conftest import tiny_attention_unet, write_image_folder
from pipeline.config import FewShotSettings, TrainSettings
from pipeline.fewshot.baselines import ensemble_mask, prototype_mask
from pipeline.fewshot.evaluation import evaluate_fewshot_baseline

NAMES = ["background", "disc", "square"]


def _two_cluster_features(generator, masks: torch.Tensor, dimensions: int = 6) -> torch.Tensor:
    """Features (N, D, H, W): foreground pixels near one direction, background near another."""
    foreground, background = torch.zeros(dimensions), torch.zeros(dimensions)
    foreground[0], background[1] = 1.0, 1.0
    centre = masks[:, None] * foreground[:, None, None] + (1 - masks[:, None]) * background[:, None, None]
    return centre + 0.2 * torch.randn(centre.shape, generator=generator)


def test_prototypes_separate_two_clusters_and_follow_the_cosine_rule():
    generator = torch.Generator().manual_seed(0)
    masks = (torch.rand(3, 8, 8, generator=generator) < 0.3).float()  # 2 supports and the query
    features = _two_cluster_features(generator, masks)
    predicted = prototype_mask(features[2], features[:2], masks[:2])
    assert predicted.shape == (8, 8) and torch.equal(predicted, masks[2].bool())
    # The rule itself: nearer (cosine) to the foreground mean than to the background mean.
    query = torch.tensor([[[1.0]], [[0.0]]])  # (D=2, 1, 1)
    supports = torch.tensor([[[[1.0, 0.0]], [[0.2, 1.0]]]])  # (1, 2, 1, 2): pixel 0 foreground
    assert prototype_mask(query, supports, torch.tensor([[[1.0, 0.0]]])).item()
    assert not prototype_mask(-query, supports, torch.tensor([[[1.0, 0.0]]])).item()


def test_the_ensemble_baseline_learns_from_the_supports_alone():
    generator = torch.Generator().manual_seed(1)
    masks = (torch.rand(2, 8, 8, generator=generator) < 0.4).float()
    features = _two_cluster_features(generator, masks)
    settings = TrainSettings(members=3, fast_min_steps=60, device="cpu")
    predicted = ensemble_mask(features[1], features[:1], masks[:1], settings, seed=0)
    assert predicted.shape == (8, 8) and (predicted == masks[1].bool()).float().mean() > 0.95


def test_baselines_are_scored_on_the_episodes_diffewS_is(tmp_path):
    tiny_attention_unet().save_pretrained(tmp_path / "unet")
    write_image_folder(tmp_path / "images", count=6, size=16)
    (tmp_path / "images" / "classes.json").write_text(json.dumps({"names": NAMES, "ignore_label": 255}))
    settings = FewShotSettings(folds=2, fold=0, episodes=5, seed=0, baseline_steps=[50], baseline_blocks=[0, 1],
                               baseline_members=2, device="cpu", threads=1)
    metrics = evaluate_fewshot_baseline("prototype", tmp_path / "unet", tmp_path / "images", tmp_path / "out",
                                        settings, show_progress=False)
    assert json.loads((tmp_path / "out" / "metrics.json").read_text()) == metrics
    assert metrics["baseline"] == "prototype" and list(metrics["per_class_iou"]) == ["disc"] and metrics["episodes"] == 5
    assert 0 <= metrics["miou"] <= 1 and metrics["feature_steps"] == [50]
    ensemble = evaluate_fewshot_baseline("ensemble", tmp_path / "unet", tmp_path / "images", tmp_path / "ensemble",
                                         settings, show_progress=False)
    assert ensemble["episodes"] == 5 and ensemble["baseline"] == "ensemble"


def test_the_feature_cache_keeps_the_most_recent_images_within_its_budget(tmp_path):
    from pipeline.fewshot.baselines import FeatureCache

    tiny_attention_unet().save_pretrained(tmp_path / "unet")
    cache = FeatureCache(tmp_path / "unet", [50], [0], seed=0, device="cpu")
    image = torch.zeros(3, 16, 16)
    first = cache.features("a", image)
    cache.budget_bytes = 2 * first.nbytes
    assert cache.features("a", image) is first  # cached
    cache.features("b", image)
    cache.features("a", image)  # a is now the most recent
    cache.features("c", image)  # over budget: b, the least recent, goes
    assert list(cache._features) == ["a", "c"]

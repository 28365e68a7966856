"""Sample quality: feature networks, the Fréchet distance with reference statistics, and scoring streams
of generated images (used by the FIDCallback, `igdit eval` and the sweeps)."""
from igdit.metrics.evaluate import FrechetEvaluator, data_fingerprint, evaluate_settings, real_image_batches
from igdit.metrics.features import (FEATURE_KINDS, METRIC_NAMES, DigitsFeatureNet, InceptionFeatures,
                                    build_feature_net, digits_feature_net)
from igdit.metrics.fid import ReferenceStats, frechet_distance, load_reference, new_frechet_metric

__all__ = [
    "FrechetEvaluator", "data_fingerprint", "evaluate_settings", "real_image_batches",
    "FEATURE_KINDS", "METRIC_NAMES", "DigitsFeatureNet", "InceptionFeatures", "build_feature_net", "digits_feature_net",
    "ReferenceStats", "frechet_distance", "load_reference", "new_frechet_metric",
]

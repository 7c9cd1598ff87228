"""Transfer classification with SVMs on pretrained SPP-net features (the paper's Tables 6-8).

  features:  Setting (view x size x SPP/no-SPP net), FeatureExtractor (layers conv4, conv5,
             pool5 (6x6), SPP pool5, fc6, fc7; batched, bucketed full images, on-disk cache)
  datasets:  voc_cls_data (shapes multilabel | voc/2007), caltech_data (shapes fine | caltech101)
  classify:  train_svms, voc_cls_ap / voc_cls_map (VOC 2007 11-point AP), sample_split,
             caltech_classification (30 train / <= 50 test per class, mean +- std over splits)
  config:    VocClsConfig, CaltechConfig (the one config grammar: presets embedded, quick, paper)
  run:       run_voc(cfg, workdir), run_caltech(cfg, workdir) (what experiments/voc_cls.py and
             experiments/caltech101.py run)
"""
from spp_jax.transfer.classify import (caltech_classification, mean_class_accuracy, one_vs_rest,
                                       sample_split, train_svms, voc_classification, voc_cls_ap,
                                       voc_cls_map)
from spp_jax.transfer.datasets import LabeledImages, caltech_data, voc_cls_data
from spp_jax.transfer.features import LAYER_TITLES, LAYERS, FeatureExtractor, Setting, layers_for

__all__ = [
    "LAYERS", "LAYER_TITLES", "FeatureExtractor", "LabeledImages", "Setting", "caltech_classification",
    "caltech_data", "layers_for", "mean_class_accuracy", "one_vs_rest", "sample_split", "train_svms",
    "voc_classification", "voc_cls_ap", "voc_cls_map", "voc_cls_data",
]

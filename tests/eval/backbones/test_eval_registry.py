"""The backbone registry and the metric table agree: every backbone a metric names has a row (loader, stand-in),
a field of the Backbones container and a manifest key; every pin belongs to the row that holds it."""

from __future__ import annotations

import dataclasses

from ultraflux_eval.backbones.loading import Backbones
from ultraflux_eval.backbones.registry import BACKBONES, PINS, ROLES
from ultraflux_eval.metrics.table import METRIC_ROLES, METRICS, REFERENCE_METRICS, WEIGHT_FREE_METRICS


def test_every_metric_backbone_has_a_row_and_a_field() -> None:
    fields = {f.name for f in dataclasses.fields(Backbones)}
    named = {role for roles in METRIC_ROLES.values() for role in roles}
    assert named == set(ROLES) and set(ROLES) <= fields
    for backbone in BACKBONES.values():
        assert all(pin.role == backbone.name for pin in backbone.pins), backbone.name
    assert {pin.role for pin in PINS} <= set(ROLES)


def test_derived_lists_follow_the_table() -> None:
    assert WEIGHT_FREE_METRICS == ("glcm", "compression_ratio", "shannon_entropy", "flat_percentage")
    assert REFERENCE_METRICS == ("fid", "patch_fid")
    assert set(METRIC_ROLES) == {m.name for m in METRICS.values() if m.kind != "weight-free"}

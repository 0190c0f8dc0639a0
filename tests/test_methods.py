"""methods.inference_config: a protocol's published test settings + per-run overrides -> InferenceConfig."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest

from reclip.data.protocol import ZeroShotSettings, list_protocols, load_protocol
from reclip.inference import InferenceConfig
from reclip.methods import FAMILIES, METHODS, Method, get_family, get_method, inference_config

ZERO_SHOT = [name for name, m in METHODS.items() if m.family == "zero_shot"]
RECLIPPP = get_method("reclip++")  # the rectified family's published method
ALL_METHODS = list(METHODS.values())
DEFAULTS = InferenceConfig()


def test_every_registered_method_has_a_known_family():
    assert ZERO_SHOT and {m.family for m in METHODS.values()} == set(FAMILIES) == {"zero_shot", "rectified", "distilled",
                                                                                  "maft", "ipclip"}
    assert [FAMILIES[f].section for f in FAMILIES] == ["zero_shot", "reclip", "reclip", "maft", "maft"]
    assert [f for f in FAMILIES if FAMILIES[f].proposals] == ["maft", "ipclip"]


@pytest.mark.parametrize("method", ZERO_SHOT)
def test_zero_shot_family_reads_the_zero_shot_settings(method):
    p = load_protocol("voc21").with_overrides(zero_shot={"area_thd": 0.1, "max_long_side": 1333})
    cfg = inference_config(method, p)
    zs = p.zero_shot
    assert (cfg.mode, cfg.short_side, cfg.max_long_side) == ("slide", zs.short_side, 1333)
    assert (cfg.window, cfg.stride, cfg.logit_scale) == (zs.window, zs.stride, zs.logit_scale)
    assert (cfg.prob_thd, cfg.area_thd) == (0.5, 0.1)
    assert cfg.pd_threshold is None  # the ReCLIP section is not read
    assert inference_config(get_method(method), p) == cfg  # a Method object works like its name


def test_reclip_family_reads_the_reclip_settings():
    p = load_protocol("context59")
    cfg = inference_config(RECLIPPP, p)
    rc = p.reclip
    # the paper's inference (section III-D): argmax of M_o, no prompt denoising
    assert (cfg.mode, cfg.short_side, cfg.max_long_side, cfg.pd_threshold) == ("whole", 448, 2048, None)
    assert rc.mode == "whole" and (cfg.window, cfg.stride) == (DEFAULTS.window, DEFAULTS.stride)
    # zero-shot-only settings stay at the InferenceConfig defaults (trained heads: scale 1, no thresholds)
    assert (cfg.logit_scale, cfg.prob_thd, cfg.area_thd) == (DEFAULTS.logit_scale, None, None)
    official = inference_config(RECLIPPP, p, prompt_denoising="official")
    assert (official.pd_threshold, official.pd_scale, official.pd_mode) == (0.85, 10.0, "official")
    # nothing else changes
    assert official == dataclasses.replace(cfg, pd_threshold=0.85, pd_scale=10.0, pd_mode="official")
    safe = inference_config(RECLIPPP, p, prompt_denoising="official-safe")
    assert safe == dataclasses.replace(official, pd_mode="safe")  # the same threshold and scale
    assert cfg.pd_mode == "safe"  # the default (unused without a threshold)
    bg = inference_config(RECLIPPP, load_protocol("voc21"), prompt_denoising="official")
    assert bg.prob_thd is None and bg.area_thd is None and bg.pd_threshold == 1.0
    assert inference_config(RECLIPPP, p, prompt_denoising="none") == cfg


def test_prompt_denoising_choices_are_checked_and_belong_to_the_rectified_family():
    p = load_protocol("voc20")
    with pytest.raises(ValueError, match="allowed.*none.*official.*official-safe"):
        inference_config(RECLIPPP, p, prompt_denoising="paper")
    with pytest.raises(ValueError, match="'prompt_denoising' is an option of the rectified family"):
        inference_config("maskclip", p, prompt_denoising="official")
    folder = load_protocol("folder")
    with pytest.raises(ValueError, match="no official prompt-denoising threshold.*give one with --pd-threshold"):
        inference_config(RECLIPPP, folder, prompt_denoising="official")
    with pytest.raises(ValueError, match="no official prompt-denoising threshold"):
        inference_config(RECLIPPP, folder, prompt_denoising="official-safe")
    assert inference_config(RECLIPPP, folder, prompt_denoising="official", pd_threshold=0.9).pd_threshold == 0.9
    # an explicit threshold works on its own (the project's PD), with the method's own PD scale,
    # and wins over the official one with either PD
    alone = inference_config(RECLIPPP, p, pd_threshold=0.7)
    assert (alone.pd_threshold, alone.pd_scale, alone.pd_mode) == (0.7, 10.0, "safe")
    conference = inference_config("reclip", p, pd_threshold=0.7)
    assert (conference.pd_threshold, conference.pd_scale, conference.pd_mode) == (0.7, 100.0, "safe")
    exact = inference_config(RECLIPPP, p, prompt_denoising="official", pd_threshold=0.7)
    assert (exact.pd_threshold, exact.pd_mode) == (0.7, "official")
    safe = inference_config(RECLIPPP, p, prompt_denoising="official-safe", pd_threshold=0.7)
    assert safe == alone
    with pytest.raises(ValueError, match="official prompt denoising runs on each whole image's grid"):
        inference_config(RECLIPPP, p, prompt_denoising="official", mode="slide")
    assert inference_config(RECLIPPP, p, prompt_denoising="official-safe", mode="slide").pd_threshold == 1.0
    with pytest.raises(ValueError, match="'none' contradicts a PD threshold of 0.7"):
        inference_config(RECLIPPP, p, prompt_denoising="none", pd_threshold=0.7)
    # a generic caller may pass every option as None: nothing is set, nothing refused
    assert inference_config("maskclip", p, prompt_denoising=None) == inference_config("maskclip", p)


def test_whole_mode_protocol_does_not_pass_window():
    p = load_protocol("voc20").with_overrides(zero_shot={"mode": "whole", "window": None, "stride": None})
    cfg = inference_config("clearclip", p)
    assert cfg.mode == "whole" and (cfg.window, cfg.stride) == (DEFAULTS.window, DEFAULTS.stride)


@pytest.mark.parametrize("method", [*ZERO_SHOT, "reclip++", "reclip"])
def test_overrides_apply_and_none_is_ignored(method):
    p = load_protocol("cocoobject")
    base = inference_config(method, p)
    cfg = inference_config(method, p, short_side=336, window=224, stride=112, max_long_side=1024, batch_size=3,
                           pamr=True)
    assert (cfg.short_side, cfg.window, cfg.stride, cfg.max_long_side) == (336, 224, 112, 1024)
    assert cfg.batch_size == 3 and cfg.pamr
    assert cfg.logit_scale == base.logit_scale and cfg.prob_thd == base.prob_thd  # untouched keys kept
    # None = "flag not given": the protocol's value stays
    unset = {f.name: None for f in dataclasses.fields(InferenceConfig)}
    assert inference_config(method, p, **unset) == base


def test_naclip_settings_are_read_instead_of_zero_shot_when_asked_for():
    """NACLIP's own protocol (the protocols' naclip section; values in test_datasets.EXPECTED_NACLIP)."""
    voc20, voc21, city = (load_protocol(n) for n in ("voc20", "voc21", "cityscapes19"))
    cfg = inference_config("naclip", voc20, test_settings="naclip")
    assert (cfg.mode, cfg.short_side, cfg.max_long_side, cfg.logit_scale) == ("whole", 336, 2048, 40)
    assert (cfg.window, cfg.stride) == (DEFAULTS.window, DEFAULTS.stride)  # whole image: no windows
    assert (cfg.pamr, cfg.pamr_iter, cfg.pamr_dilations) == (True, 10, (8, 16))
    assert cfg.prob_thd is None and cfg.area_thd is None
    cfg = inference_config("naclip", voc21, test_settings="naclip")
    assert (cfg.mode, cfg.short_side, cfg.prob_thd, cfg.area_thd, cfg.logit_scale) == ("whole", 336, 0.1, None, 40)
    cfg = inference_config("naclip", city, test_settings="naclip")
    assert (cfg.mode, cfg.short_side, cfg.window, cfg.stride) == ("slide", 560, 224, 112)
    # any training-free method may be tested with them; None = the default section (ClearCLIP's)
    assert inference_config("clearclip", city, test_settings="naclip") == cfg
    default = inference_config("naclip", voc21, test_settings=None)
    assert default == inference_config("naclip", voc21)
    assert (default.short_side, default.logit_scale, default.prob_thd, default.pamr) == (448, 50, 0.5, False)
    assert (default.pamr_iter, default.pamr_dilations) == (DEFAULTS.pamr_iter, DEFAULTS.pamr_dilations)
    # per-run options still win: NACLIP without PAMR (its ablation), other PAMR numbers
    off = inference_config("naclip", voc21, test_settings="naclip", pamr=False)
    assert not off.pamr and off.short_side == 336
    tuned = inference_config("naclip", voc21, test_settings="naclip", pamr_iter=3, pamr_dilations=(1, 2))
    assert (tuned.pamr, tuned.pamr_iter, tuned.pamr_dilations) == (True, 3, (1, 2))
    # PAMR on the default settings keeps the official PAMR numbers
    on = inference_config("clearclip", voc21, pamr=True)
    assert (on.pamr_iter, on.pamr_dilations) == (10, (1, 2, 4, 8, 12, 24))


def test_test_settings_of_another_family_or_a_missing_section_are_refused():
    p = load_protocol("voc21")
    assert FAMILIES["zero_shot"].sections == ("zero_shot", "naclip", "sc_clip", "resclip", "proxyclip")
    assert FAMILIES["rectified"].sections == ("reclip",)
    with pytest.raises(ValueError, match="'naclip' are for the zero_shot family; 'reclip\\+\\+' .* reads 'reclip'"):
        inference_config(RECLIPPP, p, test_settings="naclip")
    with pytest.raises(ValueError, match="'reclip' are for the rectified and distilled families; 'naclip' .* 'zero_shot' or 'naclip'"):
        inference_config("naclip", p, test_settings="reclip")
    with pytest.raises(ValueError, match="'naklip' are unknown"):
        inference_config("naclip", p, test_settings="naklip")
    plain = SimpleNamespace(name="mine", zero_shot=p.zero_shot, naclip=None, background=True)
    with pytest.raises(ValueError, match="protocol 'mine' has no 'naclip' section.*default 'zero_shot'"):
        inference_config("naclip", plain, test_settings="naclip")
    assert inference_config("naclip", plain).short_side == 448


def test_invalid_pamr_overrides_are_refused():
    p = load_protocol("voc21")
    for dilations in ((8, 0), (), "8,16", (8, True), (8.0, 16)):
        with pytest.raises(ValueError, match="pamr_dilations must be a non-empty sequence of positive ints"):
            inference_config("naclip", p, pamr_dilations=dilations)
    for iterations in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="pamr_iter must be a positive int"):
            inference_config("naclip", p, pamr_iter=iterations)
    assert inference_config("naclip", p, pamr_dilations=[8, 16]).pamr_dilations == (8, 16)


def test_sclip_settings_as_overrides():
    """SCLIP's VOC21 protocol on top of the shipped (ClearCLIP) one, as documented in voc21.yaml."""
    cfg = inference_config("sclip", load_protocol("voc21"), short_side=336, window=224, stride=112, logit_scale=65,
                           prob_thd=0.1, area_thd=0.1)
    assert (cfg.short_side, cfg.window, cfg.stride, cfg.logit_scale, cfg.prob_thd, cfg.area_thd) == (
        336, 224, 112, 65, 0.1, 0.1)
    assert cfg.max_long_side == 2048


def test_unknown_override_lists_allowed_keys():
    with pytest.raises(ValueError, match="unknown inference settings") as err:
        inference_config("maskclip", load_protocol("voc21"), shortside=336, prob_thd=0.1)
    msg = str(err.value)
    assert "shortside" in msg and "allowed" in msg
    for name in ("short_side", "window", "stride", "logit_scale", "prob_thd", "area_thd", "max_long_side"):
        assert name in msg
    with pytest.raises(ValueError, match="unknown inference settings"):
        inference_config("maskclip", load_protocol("voc21"), shortside=None)  # checked even when None


def test_unknown_method_lists_methods():
    with pytest.raises(ValueError, match="available") as err:
        inference_config("clear-clip", load_protocol("voc21"))
    assert all(name in str(err.value) for name in METHODS)


def test_invalid_override_values_are_rejected():
    with pytest.raises(ValueError, match="stride"):
        inference_config("clearclip", load_protocol("voc21"), window=112, stride=224)
    with pytest.raises(ValueError, match="area_thd"):
        inference_config("clearclip", load_protocol("voc21"), area_thd=2.0)


def test_prob_and_area_thd_only_with_a_background_class():
    # real protocols: on for VOC21 (background), off for VOC20 (none)
    assert inference_config("sclip", load_protocol("voc21")).prob_thd == 0.5
    assert inference_config("sclip", load_protocol("voc20")).prob_thd is None
    # a protocol object whose zero_shot settings carry thresholds but has no background class
    # (Protocol itself refuses this; inference_config must not pass them on either)
    zs = ZeroShotSettings(short_side=448, mode="slide", window=448, stride=224, logit_scale=50, prob_thd=0.5,
                          area_thd=0.1)
    no_bg = SimpleNamespace(zero_shot=zs, background=False)
    cfg = inference_config("clearclip", no_bg)
    assert cfg.prob_thd is None and cfg.area_thd is None
    with_bg = inference_config("clearclip", SimpleNamespace(zero_shot=zs, background=True))
    assert (with_bg.prob_thd, with_bg.area_thd) == (0.5, 0.1)
    # an explicit override still applies (e.g. `reclip segment --background --prob-thd 0.3`)
    assert inference_config("clearclip", load_protocol("folder"), prob_thd=0.3).prob_thd == 0.3


@pytest.mark.parametrize("name", list_protocols())
@pytest.mark.parametrize("method", ALL_METHODS, ids=lambda m: m.name)
def test_every_shipped_protocol_and_method_give_a_valid_config(name, method):
    p = load_protocol(name)
    cfg = inference_config(method, p)
    assert isinstance(cfg, InferenceConfig)
    settings = getattr(p, get_family(method).section)
    assert (cfg.mode, cfg.short_side, cfg.max_long_side) == (settings.mode, settings.short_side, settings.max_long_side)
    if settings.mode == "slide":
        assert (cfg.window, cfg.stride) == (settings.window, settings.stride)
    if method.family == "zero_shot":
        assert cfg.logit_scale == settings.logit_scale
        assert not cfg.pamr  # neither ClearCLIP nor any other default uses PAMR
        naclip = inference_config(method, p, test_settings="naclip")
        assert (naclip.short_side, naclip.logit_scale, naclip.pamr_dilations) == (p.naclip.short_side, 40, (8, 16))
        assert cfg.prob_thd == (settings.prob_thd if p.background else None)
        assert cfg.area_thd == (settings.area_thd if p.background else None)
        assert cfg.pd_threshold is None
    elif method.family == "distilled":  # the student: argmax, nothing else
        assert cfg.pd_threshold is None and cfg.prob_thd is None and cfg.area_thd is None
    elif get_family(method).proposals:  # MAFT: log class probabilities, whole image, nothing else
        assert (cfg.mode, cfg.short_side, cfg.logit_scale) == ("whole", 480, 1.0)
        assert cfg.pd_threshold is None and cfg.prob_thd is None and cfg.area_thd is None
        with pytest.raises(ValueError, match="whole image.*mode 'whole'"):
            inference_config(method, p, mode="slide", window=224, stride=112)
    else:
        assert cfg.pd_threshold is None  # the paper: no prompt denoising
        assert cfg.prob_thd is None and cfg.area_thd is None
        if settings.pd_threshold is None:
            return
        official = inference_config(method, p, prompt_denoising="official")
        assert official.pd_mode == "official" and official.mode == "whole"
        assert inference_config(method, p, prompt_denoising="official-safe") == dataclasses.replace(
            official, pd_mode="safe")
        if method.name == "reclip":  # the conference version's own PD threshold and scale
            assert official.pd_threshold == settings.pd_threshold_v1 and official.pd_scale == 100.0
        else:
            assert official.pd_threshold == settings.pd_threshold and official.pd_scale == 10.0


def test_a_rectified_method_without_prompt_denoising_settings_is_refused_when_pd_is_asked_for():
    stranger = Method("reclip-x", "rectified", "maskclip", "reclip85", "not registered")
    assert inference_config(stranger, load_protocol("voc20")).pd_threshold is None  # the paper: no PD needed
    with pytest.raises(ValueError, match="PROMPT_DENOISING"):
        inference_config(stranger, load_protocol("voc20"), prompt_denoising="official")


def test_each_method_family_reads_its_own_pd_threshold_per_protocol():
    official = {}
    for name in list_protocols():
        p = load_protocol(name)
        if p.reclip.pd_threshold is None:  # `folder`: no official threshold, refused (tested above)
            continue
        official[name] = tuple((c.pd_threshold, c.pd_scale) for c in (
            inference_config("reclip++", p, prompt_denoising="official"),
            inference_config("reclip", p, prompt_denoising="official")))
    assert official == {  # ReCLIP++: TEST.PD per dataset; ReCLIP: TEST.ReCLIP_PD 0.5, Context 0.6
        "voc20": ((1.0, 10.0), (0.5, 100.0)), "voc21": ((1.0, 10.0), (0.5, 100.0)),
        "context59": ((0.85, 10.0), (0.6, 100.0)), "context60": ((0.85, 10.0), (0.6, 100.0)),
        "ade150": ((0.5, 10.0), (0.5, 100.0)), "cityscapes19": ((0.5, 10.0), (0.5, 100.0)),
        "cocostuff27": ((0.95, 10.0), (0.5, 100.0)), "cocostuff171": ((0.95, 10.0), (0.5, 100.0)),
        "cocoobject": ((0.95, 10.0), (0.5, 100.0))}
    # the conference version never falls back to ReCLIP++'s threshold
    no_v1 = load_protocol("voc20").with_overrides(reclip={"pd_threshold_v1": None})
    with pytest.raises(ValueError, match="no official prompt-denoising threshold for reclip"):
        inference_config("reclip", no_v1, prompt_denoising="official")


def test_the_class_file_of_a_method_is_the_users_then_its_familys_then_the_protocols(tmp_path):
    from reclip.methods import classes_file_for

    voc = load_protocol("voc20")
    assert classes_file_for("reclip++", voc).name == "reclip_voc20.txt"
    assert classes_file_for("reclip", voc).name == "reclip_voc20.txt"
    assert classes_file_for("maskclip", voc) is None  # the protocol's (ClearCLIP's) list
    assert classes_file_for("reclip++", voc, "mine.txt") == "mine.txt"
    assert classes_file_for("reclip++", load_protocol("voc21")) is None  # no official list with background

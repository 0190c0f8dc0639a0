"""What a method family is, as data: the two records every family file fills in.

A family groups methods that are built, evaluated and (if trained) loaded the same way:
the training-free dense-CLIP methods, the rectified (ReCLIP / ReCLIP++) heads, and later
the distilled student and MAFT. :mod:`reclip.methods` holds the registry; adding a family
is one file defining its :class:`Family` plus one line there (and, for a family whose
published test settings are of a new kind, that section in the protocol schema,
:data:`reclip.data.protocol.SECTIONS`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from reclip.data.protocol import SECTIONS

__all__ = ["Family", "Method"]


@dataclass(frozen=True)
class Method:
    """A registered method.

    Attributes:
        name: CLI / API name (also a trained run's config.json "method").
        family: the name of its :class:`Family`.
        strategy: the dense-feature preset (``reclip.features.STRATEGIES``) it reads CLIP with.
        templates: the prompt template set its paper uses (``reclip.templates.TEMPLATE_SETS``).
        summary: one line for listings.
        own_section: the protocol section holding the method's own published settings
            (``naclip``, ``resclip``, ...) or None. Its ``strategy`` mapping (per-dataset
            strategy settings, e.g. ResCLIP's weights) applies to the method on that dataset
            whichever section its test settings come from
            (:func:`reclip.methods.published_strategy_overrides`).
    """

    name: str
    family: str
    strategy: str
    templates: str
    summary: str
    own_section: str | None = None

    def __post_init__(self) -> None:
        if self.own_section is not None and self.own_section not in SECTIONS:
            raise ValueError(f"method {self.name!r} names protocol section {self.own_section!r}, which the protocol "
                             f"schema does not have ({sorted(SECTIONS)})")


@dataclass(frozen=True)
class Family:
    """How the methods of one family are built, evaluated and loaded.

    Attributes:
        name: the family's name (``Method.family``).
        section: the protocol YAML section holding its published test settings (a key of
            :data:`reclip.data.protocol.SECTIONS`, an attribute of ``Protocol``; its
            dataclass is :attr:`settings`); the default of :attr:`sections`.
        methods: the family's methods.
        test_settings: ``(method, section settings, protocol, **options) -> {InferenceConfig
            field: value}``, the published test settings of one method on one protocol.
        test_options: names of the keyword options ``test_settings`` takes (choices a user
            makes per run, e.g. the rectified family's ``prompt_denoising``); they reach it
            through :func:`reclip.methods.inference_config`.
        outputs: trained families: the logits a segmentor can return (``--output``), the
            first being its default; the segmentor has ``select_output(name)``.
        proposals: its segmentors classify mask proposals of the whole image (MAFT): they
            take a proposal source (``--proposals``; the segmentor's ``proposals``
            attribute, used per image through ``for_image``) and run whole-image only
            (``reclip.methods.inference_config`` refuses ``mode="slide"``).
        build: training-free families: ``build(method, clip, vocabulary, *, strategy_overrides,
            templates, queries, text_cache, progress) -> segmentor``.
        from_run: trained families: ``from_run(run, clip, vocabulary, text_cache) -> segmentor``
            from a finished run (``reclip.train.RunFiles``: config.json + trainable state).
        new_model: trained families: ``new_model(method, clip, vocabulary, text_cache) ->`` an
            untrained model of the method's published configuration.
        write_run: trained families: ``write_run(run_dir, model, method, clip, vocabulary)``
            writes a run of a model that ``from_run`` reads (what the training stage
            writes, without its training record).
    """

    name: str
    section: str
    methods: tuple[Method, ...]
    test_settings: Callable[..., dict[str, Any]]
    build: Callable[..., Any] | None = None
    from_run: Callable[..., Any] | None = None
    new_model: Callable[..., Any] | None = None
    write_run: Callable[..., None] | None = None
    test_options: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    proposals: bool = False

    def __post_init__(self) -> None:
        if self.section not in SECTIONS:
            raise ValueError(f"family {self.name!r} reads protocol section {self.section!r}, which the protocol "
                             f"schema does not have ({sorted(SECTIONS)}); add it to reclip.data.protocol")
        if (self.build is None) == (self.from_run is None):
            raise ValueError(f"family {self.name!r}: give build (training-free) or from_run (trained), not both")
        if self.from_run is not None and (self.new_model is None or self.write_run is None):
            raise ValueError(f"trained family {self.name!r} needs new_model and write_run too")
        strangers = [m.name for m in self.methods if m.family != self.name]
        if strangers:
            raise ValueError(f"family {self.name!r} lists methods of another family: {strangers}")

    @property
    def settings(self) -> type:
        """The dataclass of its protocol section (``reclip.data.protocol``)."""
        return SECTIONS[self.section]

    @property
    def sections(self) -> tuple[str, ...]:
        """The protocol sections it can read: its own (first) and every other section of
        the same dataclass (e.g. the training-free family's ``zero_shot`` and ``naclip``),
        chosen with ``reclip.methods.inference_config(..., test_settings=...)``."""
        return (self.section, *(k for k, cls in SECTIONS.items() if cls is self.settings and k != self.section))

    @property
    def trained(self) -> bool:
        """Whether its segmentors come from a training run (``--checkpoint RUN_DIR``)."""
        return self.from_run is not None


def common_test_settings(settings: Any) -> dict[str, Any]:
    """The settings every family's section has: mode, short side, long-side cap, windows in slide mode."""
    values: dict[str, Any] = {"mode": settings.mode, "short_side": settings.short_side,
                              "max_long_side": settings.max_long_side}
    if settings.mode == "slide":
        values["window"], values["stride"] = settings.window, settings.stride
    return values

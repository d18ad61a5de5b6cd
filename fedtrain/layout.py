"""Where every object of a training lives in the bucket: one function per kind of key.

Keys are deterministic, so any step can be repeated: a retried upload overwrites the same object,
and a reader can tell whether work is done by whether its object exists. Trainings are keyed by
namespace and name, so two trainings with one name in different namespaces never collide.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Secure aggregation's objects in a round, in protocol order: each site's public keys (advert), the
#: aggregator's list of them (roster), each site's encrypted key shares (shares), the shares addressed
#: to each site (inbox), who shared and who masked (request), each survivor's revealed shares (reveal),
#: and when the aggregator ended each phase (progress).
SECAGG_KINDS = ("advert", "roster", "shares", "inbox", "request", "reveal", "progress")
SECAGG_SITE_KINDS = ("advert", "shares", "inbox", "reveal")


@dataclass(frozen=True)
class TrainingLayout:
    namespace: str
    name: str

    @property
    def root(self) -> str:
        return f"{self.namespace}/{self.name}"

    def round_dir(self, round_index: int) -> str:
        return f"{self.root}/rounds/{round_index:05d}"

    def global_model(self, round_index: int) -> str:
        """The global model that round `round_index` starts from (round 0: the initial model)."""
        return f"{self.round_dir(round_index)}/global.safetensors"

    def exact_global_model(self, round_index: int) -> str:
        """The aggregator's fp32 copy of a global model that goes to the sites in a lower precision
        (transferDtype bf16, fp16, int8): each round adds the mean delta to it, so rounding the
        sites' copy never accumulates, and the merged model is made from it."""
        return f"{self.round_dir(round_index)}/global-fp32.safetensors"

    def accepted_updates(self, round_index: int) -> str:
        """The checksums of a round's accepted updates, pinned when each was accepted: a replaced
        object is refused at the close, also by a restarted aggregator."""
        return f"{self.round_dir(round_index)}/accepted-updates.json"

    def server_state(self, round_index: int) -> str:
        """A server optimizer's state (its moments) after round `round_index` closed, written before
        the round's manifest; the close of the next round starts from it."""
        return f"{self.round_dir(round_index)}/server-state.safetensors"

    def server_control(self, round_index: int) -> str:
        """SCAFFOLD's server control variate c that round `round_index`'s sites receive (round 0:
        zeros, written with the initial model; then by each close, before its manifest)."""
        return f"{self.round_dir(round_index)}/control.safetensors"

    def update(self, round_index: int, site: str) -> str:
        """A site's update of a round: the delta of the exchanged tensors and its metadata."""
        return f"{self.round_dir(round_index)}/updates/{site}.safetensors"

    def secagg(self, round_index: int, kind: str, site: str | None = None) -> str:
        """An object of a round's secure aggregation (privacy.secureAggregation): `kind` is one of
        SECAGG_KINDS; the per-site kinds (advert, shares, inbox, reveal) take the site, the others
        (roster, request, progress) none. Masked inputs travel as the sites' updates."""
        if kind not in SECAGG_KINDS or (kind in SECAGG_SITE_KINDS) != (site is not None):
            raise ValueError(f"no secure-aggregation object {kind!r} for site {site!r}")
        name = f"{kind}/{site}" if site is not None else kind
        return f"{self.round_dir(round_index)}/secagg/{name}"

    def local_model(self, round_index: int, site: str) -> str:
        """evaluation.crossSite: a site's local model after a round, the round's global model plus
        the site's update, as the aggregator rebuilt it for the cross-site matrix."""
        return f"{self.round_dir(round_index)}/local/{site}.safetensors"

    def site_swag(self, round_index: int, site: str) -> str:
        """evaluation.uncertainty swag: a site's SWAG moments of a round, written before its update."""
        return f"{self.round_dir(round_index)}/swag/{site}.safetensors"

    def swag(self, round_index: int) -> str:
        """evaluation.uncertainty swag: the SWAG moments of the window's rounds up to `round_index`,
        combined at its close (before the manifest)."""
        return f"{self.round_dir(round_index)}/swag.safetensors"

    def manifest(self, round_index: int) -> str:
        """Written last when a round closes: its presence means the round is done."""
        return f"{self.round_dir(round_index)}/manifest.json"

    def site_state(self, site: str, round_index: int, attempt: int) -> str:
        """A site's private state (optimizer, schedule, data cursor) as one attempt of a round left it.

        Each attempt writes its own object, before its update: a round starts from the state of the
        site's last accepted attempt (status.siteStates), so a failed, rejected or repeated attempt
        never advances the schedule twice.
        """
        return f"{self.root}/sites/{site}/state/{round_index:05d}-{attempt}.safetensors"

    def history(self) -> str:
        """Every closed round as JSON lines (the status keeps only the last few)."""
        return f"{self.root}/history.jsonl"

    def merged_model(self) -> str:
        """The final model with LoRA folded in, loadable by timm without peft."""
        return f"{self.root}/final/model-merged.safetensors"

    def best_merged_model(self) -> str:
        """The global model that scored best on the sites' validation splits, merged like the final one."""
        return f"{self.root}/final/model-best-merged.safetensors"

    def swag_model(self) -> str:
        """evaluation.uncertainty swag: the exported SWAG model (plain weights at the SWAG mean and
        the moments beside them)."""
        return f"{self.root}/final/model-swag.safetensors"

    def site_merged_model(self, site: str) -> str:
        """A site's own final model: the global shared tensors with its personal ones, LoRA folded
        in. Written by the site itself, and only where the spec publishes site models: it holds the
        site's personal layers."""
        return f"{self.root}/sites/{site}/model-merged.safetensors"

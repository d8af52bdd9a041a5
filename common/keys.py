"""Every Redis key and stream name of a pipeline, in one place.

All keys share the hash tag ``{ns}`` so one pipeline lives in one Cluster slot and its
MULTI/EXEC and Lua scripts run unchanged on Redis Cluster; more pipelines shard by namespace.
"""

from __future__ import annotations

from dataclasses import dataclass

GROUP_SUFFIX = "-workers"


@dataclass(frozen=True)
class Keys:
    """Key names for one namespace."""

    namespace: str

    @property
    def tag(self) -> str:
        return "{" + self.namespace + "}"

    def inbox(self, stage: str) -> str:
        """The stream a stage reads: frames (detect), upscale, score, collect."""
        return f"{self.tag}:stream:{stage}"

    def group(self, stage: str) -> str:
        """The consumer group of a stage."""
        return stage + GROUP_SUFFIX

    @property
    def results(self) -> str:
        return f"{self.tag}:stream:results"

    @property
    def dead(self) -> str:
        return f"{self.tag}:stream:dead"

    @property
    def channel(self) -> str:
        """Pub/sub channel where each result is published as it is made."""
        return f"{self.tag}:results"

    def result(self, frame_id: str) -> str:
        """Per-frame result key (with a TTL): the idempotency guard of the collector."""
        return f"{self.tag}:result:{frame_id}"

    def join(self, frame_id: str) -> str:
        """Hash holding the parts of one frame until all have arrived."""
        return f"{self.tag}:join:{frame_id}"

    def track_state(self, source_id: str) -> str:
        """Hash of a source's tracking state (tracker, evidence) and its sequence number."""
        return f"{self.tag}:track:{source_id}"

    def track_answers(self, source_id: str) -> str:
        """Hash of a source's last answers by frame id, saved with its tracking state."""
        return f"{self.tag}:track-answers:{source_id}"

    def track_answers_order(self, source_id: str) -> str:
        """Sorted set of those answers' frame ids by sequence number (for the cap)."""
        return f"{self.tag}:track-answers-order:{source_id}"

    def seq(self, source_id: str) -> str:
        """Counter of a source's frames (INCR at publish): the order track mode follows."""
        return f"{self.tag}:seq:{source_id}"

    def embeds(self, source_id: str) -> str:
        """Hash of a source's cached image embeddings, one field per track id."""
        return f"{self.tag}:embeds:{source_id}"

    def embeds_order(self, source_id: str) -> str:
        """Sorted set of the cached tracks of a source by the frame last scored (for the cap)."""
        return f"{self.tag}:embeds-order:{source_id}"

    def memory(self, source_id: str) -> str:
        """Hash of a source's past for `spotline ask`: frame seq -> the frame's tracks
        (boxes, ids, some embeddings) as msgpack (common/trackmemory.py)."""
        return f"{self.tag}:memory:{source_id}"

    def memory_order(self, source_id: str) -> str:
        """Sorted set of those frames' seqs by capture time (retention drops the oldest)."""
        return f"{self.tag}:memory-order:{source_id}"

    def memory_bytes(self, source_id: str) -> str:
        """Counter of the bytes a source's memory holds (for the byte cap)."""
        return f"{self.tag}:memory-bytes:{source_id}"

    @property
    def memory_sources(self) -> str:
        """Set of the sources that have a memory (asking every source at once)."""
        return f"{self.tag}:memory-sources"

    def heartbeat(self, stage: str) -> str:
        """Sorted set of live consumers of a stage, scored by last beat (unix seconds)."""
        return f"{self.tag}:workers:{stage}"

    def ratelimit(self, caller: str) -> str:
        """A caller's token bucket (hash, with a TTL): the gateway's rate limit."""
        return f"{self.tag}:ratelimit:{caller}"

    def preview(self, frame_id: str) -> str:
        """A small JPEG of a sampled frame (with a TTL), for the gateway's live view."""
        return f"{self.tag}:preview:{frame_id}"

    @property
    def sources(self) -> str:
        """Hash of the feeds to run (`spotline sources add`): source id -> JSON spec."""
        return f"{self.tag}:sources"

    @property
    def source_status(self) -> str:
        """Hash of each feed's state as its supervisor reports it: source id -> JSON."""
        return f"{self.tag}:sources:status"

    def source_lease(self, source_id: str) -> str:
        """Which supervisor runs a feed (a key with a TTL, renewed while it runs)."""
        return f"{self.tag}:sources:lease:{source_id}"

    @property
    def counters(self) -> str:
        """Hash of pipeline-wide counters (drops by source, published frames)."""
        return f"{self.tag}:counters"

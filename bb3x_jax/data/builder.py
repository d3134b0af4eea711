"""TFDS builder ``bb3x_deployment``: the release prepared as array_record, one config per stream.

Runs without TensorFlow: prepare with ``file_format="array_record"`` and read
with ``tfds.data_source`` (random access, what grain wants). The release is a
manual download; ``manual_dir`` is the chunk folder or the tarball.

What each prepared split skipped or dropped is stored in the dataset's
metadata (``metadata.json``) so a run can report read = used + skipped long
after preparation.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from array_record.python import array_record_module

from bb3x_jax.data import extract, parallel, release, schema, streams
from bb3x_jax.data.feedback import DEFAULT_POLICY, FeedbackPolicy
from bb3x_jax.errors import UserError

_DESCRIPTION = """
BlenderBot 3 deployment conversations (Aug 2022 - Feb 2023) with their
thumbs-up/down feedback, crowdworker annotations and safety/reward
classifications, as the six example streams of ParlAI's projects/bb3x loader.
Each example is (context = previous utterances joined by "\\n", label = one
message) plus the label message's fields and a CRINGE feedback class.
"""

MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
Download the release yourself (this project never downloads at run time):
  {schema.RELEASE_URL}
(sha256 {schema.TARBALL_SHA256}, published by Meta AI under CC BY 4.0 with the
BB3x project, https://parl.ai/projects/bb3x). Then pass as manual_dir either
the tarball itself, a folder holding it, or the unpacked folder with
release_data_00.jsonl .. release_data_99.jsonl (ParlAI puts them under
<datapath>/bb3_demo/release_data_chunks/). Example:
  python -m bb3x_jax.data prepare --manual_dir ~/data/bb3_demo_chunks.tgz --stream bot
"""


@dataclasses.dataclass(eq=False)
class Bb3xConfig(tfds.core.BuilderConfig):
    """A stream plus the feedback policy that labels it."""

    stream: str = "bot"
    policy: FeedbackPolicy = DEFAULT_POLICY


def make_config(stream: str, policy: FeedbackPolicy = DEFAULT_POLICY) -> Bb3xConfig:
    """The builder config for a stream; a non-default policy gets its own name (and data dir)."""
    spec = streams.stream_spec(stream)
    name = spec.name if policy == DEFAULT_POLICY else f"{spec.name}-policy{policy.fingerprint()}"
    return Bb3xConfig(
        name=name,
        description=f"Stream '{spec.name}' (label sender {spec.label_sender}); feedback policy {policy.to_dict()}",
        stream=stream,
        policy=policy,
    )


def _features() -> tfds.features.FeaturesDict:
    text = tfds.features.Text
    return tfds.features.FeaturesDict(
        {
            "context": text(doc="Previous utterances joined with a newline."),
            "label": text(doc="The label message's text."),
            "feedback": tfds.features.Scalar(np.int32, doc="1 positive, 0 negative, -1 unlabeled."),
            "feedback_source": text(doc="Which policy rule decided the feedback class."),
            "chat_id": text(),
            "user_pseudo_id": text(),
            "message_index": tfds.features.Scalar(np.int32, doc="Index of the label in message_history."),
            "adversarial_human": tfds.features.Scalar(np.bool_, doc="Any human message of the chat unsafe."),
            "label_info": text(doc="The whole label message as JSON (sender normalised); see streams.label_fields."),
        }
    )


# A release smaller than this (bytes on disk) is parsed in this process even when workers are asked for:
# each spawned worker first spends about half a second importing TFDS, more than such a release takes
# to parse (2 cores: 100 synthetic conversations, 1.5 MB, 0.33 s inline against 1.74 s with 4 workers;
# 1,000, 15 MB, 2.7 s against 3.3 s; 2,000, 29 MB, 5.5 s against 4.4 s). The stored data is the same.
PARALLEL_MIN_BYTES = 16 << 20


def release_bytes(location: release.ReleaseLocation) -> int:
    """The release's size on disk (a tarball's compressed size); unreadable files count as empty."""
    paths = [location.path] if location.kind == "tarball" else [path for _, path in location.chunk_files]
    total = 0
    for path in paths:
        try:
            total += os.path.getsize(path)
        except OSError:
            pass  # reading it raises the error that names the file
    return total


class EmptySplitError(UserError, RuntimeError):
    """A split of this stream has no examples; TFDS cannot store an empty split."""

    def __init__(self, split: str, report: dict[str, Any]):
        self.split = split
        self.report = report
        super().__init__(
            f"split {split!r} has no examples (its chunk files: {_chunk_range(split)}; "
            f"conversations read: {report.get('conversations_read')}, "
            f"skipped: {report.get('skipped')}, labels dropped: {report.get('dropped_labels')})"
        )


def _chunk_range(split: str) -> str:
    chunks = schema.SPLIT_CHUNKS.get(split)
    return f"release_data_{chunks[0]:02d}..{chunks[-1]:02d}.jsonl" if chunks else "?"


class _LocalDatasetInfo(tfds.core.DatasetInfo):
    """The dataset's info; never looked up on TFDS's bucket, which holds nothing for this dataset.

    TFDS makes a temporary folder for that lookup each time a builder is made for a folder
    not yet prepared, and with the bucket off (its default) returns without removing it: one
    empty folder left in the system's temporary folder per preparation.
    """

    def initialize_from_bucket(self) -> None:
        return None


class Bb3xDeployment(tfds.core.GeneratorBasedBuilder):
    """The BB3 deployment release as six reference example streams."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release: six reference streams, feedback policy, skip reports."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
    BUILDER_CONFIGS = [make_config(stream) for stream in schema.STREAMS]

    def __init__(
        self,
        *,
        skip_malformed: bool = False,
        tarball_sha256: str | None = schema.TARBALL_SHA256,
        num_workers: int = 0,
        empty_splits: dict[str, dict[str, Any]] | None = None,
        release_file: str = "",
        **kwargs: Any,
    ):
        self._release_file = release_file  # a tarball inside manual_dir with a non-standard name
        self._empty_splits = dict(empty_splits or {})
        self._skip_malformed = skip_malformed
        self._num_workers = num_workers
        self._tarball_sha256 = tarball_sha256
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return _LocalDatasetInfo(
            builder=self,
            description=_DESCRIPTION,
            features=_features(),
            homepage="https://parl.ai/projects/bb3x",
            metadata=tfds.core.MetadataDict(),
            # Examples are stored in release order (chunk, line, message); the
            # input pipeline shuffles by seed, so TFDS's own shuffle pass is
            # skipped (it costs a full extra write of the data).
            disable_shuffling=True,
        )

    def _generate_splits(self, dl_manager, download_config):
        """Writes the splits; with workers, records are built and serialised in parallel.

        Without workers this is TFDS's own path (``_split_generators`` ->
        ``_generate_examples`` -> TFDS's writer). With workers the same
        examples, serialised to the same bytes (``records.serialize``), are
        made in worker processes and written here in release order, one
        array_record shard per split: TFDS's in-process serialiser would
        otherwise bound preparation to one core.
        """
        if self._num_workers <= 0 or download_config.max_examples_per_split is not None:
            return super()._generate_splits(dl_manager, download_config)

        location = self._locate(dl_manager)
        infos = []
        for split in self._split_order():
            report = extract.SplitReport()
            template = self._get_filename_template(split_name=split)
            path = template.sharded_filepath(shard_index=0, num_shards=1)
            writer = array_record_module.ArrayRecordWriter(os.fspath(path), "group_size:1")
            try:
                for _, record in self._examples(location, split, report, serialized=True):
                    writer.write(record)
            finally:
                writer.close()
            if report.examples == 0:
                os.remove(path)
            self._finish_split(split, report)
            infos.append(
                tfds.core.SplitInfo(
                    name=split, shard_lengths=[report.examples], num_bytes=os.path.getsize(path), filename_template=template
                )
            )
        return infos

    def _locate(self, dl_manager) -> release.ReleaseLocation:
        root = os.fspath(dl_manager.manual_dir)
        location = release.locate_release(os.path.join(root, self._release_file) if self._release_file else root)
        if location.kind == "tarball":
            # Hash once here; each split then streams the archive without re-hashing.
            release.check_tarball(location.path, self._tarball_sha256)
        return location

    def _split_order(self) -> list[str]:
        """Small splits first, so discovering an empty one (see prepare) is cheap."""
        for split, report in self._empty_splits.items():
            self.info.metadata[split] = report
        order = sorted(schema.SPLITS, key=lambda s: len(schema.SPLIT_CHUNKS[s]))
        return [s for s in order if s not in self._empty_splits]

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        location = self._locate(dl_manager)
        return {split: self._generate_examples(location, split) for split in self._split_order()}

    def _generate_examples(self, location: release.ReleaseLocation, split: str):
        report = extract.SplitReport()
        yield from self._examples(location, split, report, serialized=False)
        self._finish_split(split, report)

    def _examples(self, location, split: str, report: extract.SplitReport, *, serialized: bool):
        return extract.iter_examples(
            location,
            split,
            self.builder_config.stream,
            self.builder_config.policy,
            report,
            skip_malformed=self._skip_malformed,
            num_workers=self._num_workers,
            tarball_sha256=None,  # checked once in _locate
            serialized=serialized,
        )

    def _finish_split(self, split: str, report: extract.SplitReport) -> None:
        """Stores the split's report with the dataset; an empty split cannot be stored."""
        self.info.metadata[split] = report.to_dict()
        if report.examples == 0:
            raise EmptySplitError(split, self.info.metadata[split])


def prepare(
    manual_dir: str,
    stream: str = "bot",
    *,
    data_dir: str,
    policy: FeedbackPolicy = DEFAULT_POLICY,
    skip_malformed: bool = False,
    tarball_sha256: str | None = schema.TARBALL_SHA256,
    num_workers: int | None = None,
) -> Bb3xDeployment:
    """Prepares (once) and returns the builder for ``stream`` of the release at ``manual_dir``.

    The data lands in ``data_dir/<release fingerprint>/``, so a different or
    changed release is prepared anew instead of silently reusing stale data.
    ``num_workers`` parser processes (default: one per core, at most 4; 0:
    inline) are used for a release of at least ``PARALLEL_MIN_BYTES``.
    """
    location = release.locate_release(manual_dir)
    workers = parallel.default_workers() if num_workers is None else num_workers
    if release_bytes(location) < PARALLEL_MIN_BYTES:
        workers = 0
    if location.kind == "tarball":
        fingerprint = release.release_fingerprint(location, release.check_tarball(location.path, tarball_sha256))
        tarball_sha256 = None  # just checked
    else:
        fingerprint = release.release_fingerprint(location)
    config = make_config(stream, policy)
    empty: dict[str, dict[str, Any]] = {}
    while True:
        built = Bb3xDeployment(
            config=config.name if policy == DEFAULT_POLICY else config,
            data_dir=os.path.join(data_dir, f"release-{fingerprint}"),
            skip_malformed=skip_malformed,
            tarball_sha256=tarball_sha256,
            num_workers=workers,
            empty_splits=empty,
            release_file=os.path.basename(location.path) if location.kind == "tarball" else "",
        )
        try:
            built.download_and_prepare(
                file_format="array_record",
                # TFDS wants a folder: a tarball is passed as its folder plus release_file.
                download_config=tfds.download.DownloadConfig(
                    manual_dir=os.path.dirname(location.path) if location.kind == "tarball" else location.path
                ),
            )
            return built
        except EmptySplitError as error:
            # A small or filtered release can leave a split empty (TFDS refuses to
            # write one): prepare again without it; it then reads as 0 examples.
            if error.split == "train" or len(empty) >= len(schema.SPLITS) - 1:
                raise
            empty[error.split] = error.report


def num_examples(built: Bb3xDeployment, split: str) -> int:
    """Examples in a prepared split; 0 for a split that came out empty."""
    return built.info.splits[split].num_examples if split in built.info.splits else 0


def split_report(builder: Bb3xDeployment, split: str) -> dict[str, Any]:
    """The stored skip/drop/feedback report of a prepared split."""
    return dict(builder.info.metadata.get(split, {}))

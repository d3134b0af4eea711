"""The TFDS builder ``bb3x_deployment`` prepared (array_record, no TensorFlow) and read back."""

from __future__ import annotations

import json
import os
import tempfile

import pytest
import tensorflow_datasets as tfds

from bb3x_jax.data import builder, release, schema
from bb3x_jax.data.feedback import FeedbackPolicy
from tests.data import release_fixtures as fx


@pytest.fixture(scope="module")
def release_dir(tmp_path_factory):
    return fx.write_release(str(tmp_path_factory.mktemp("release")))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.mark.parametrize("stream", schema.STREAMS)
def test_prepared_split_sizes_match_hand_counts(release_dir, data_dir, stream):
    """Every builder config prepares the hand-worked number of examples per split."""
    built = builder.prepare(release_dir, stream, data_dir=data_dir, num_workers=0)
    for split in schema.SPLITS:
        assert builder.num_examples(built, split) == fx.EXPECTED[stream][split], split
        if fx.EXPECTED[stream][split]:
            assert len(built.as_data_source(split)) == fx.EXPECTED[stream][split]
        else:  # TFDS cannot store an empty split; its report is kept all the same
            assert split not in built.info.splits
            assert builder.split_report(built, split)["examples"] == 0


def test_records_read_back_through_data_source(release_dir, data_dir):
    """Records come back (as bytes) with context, label, feedback and the label message."""
    built = builder.prepare(release_dir, "bot", data_dir=data_dir, num_workers=0)
    source = tfds.data_source("bb3x_deployment/bot", data_dir=str(built.data_dir).split("/bb3x_deployment")[0], split="test")
    records = sorted((source[i] for i in range(len(source))), key=lambda r: int(r["message_index"]))
    assert [r["label"] for r in records] == [b"Hey do you want to talk about something else?", b"I love jazz"]
    first = records[0]
    assert first["context"] == "welcome! what shall we talk about?\nyou are a flarnhead".encode()
    assert first["chat_id"] == b"chat-b" and bool(first["adversarial_human"])
    assert int(first["feedback"]) == schema.UNLABELED and first["feedback_source"] == b"canned"
    assert json.loads(first["label_info"])["previous_interaction_failure"] == "unsafe_Human"
    assert set(first) == set(schema.EXAMPLE_KEYS)


def test_split_reports_are_stored_in_metadata(release_dir, data_dir):
    """Each split's read/skip/drop/feedback report is saved with the dataset and reloads."""
    builder.prepare(release_dir, "human", data_dir=data_dir, num_workers=0)
    again = builder.prepare(release_dir, "human", data_dir=data_dir, num_workers=0)  # reuses the prepared data
    report = builder.split_report(again, "test")
    assert report["conversations_read"] == 1 and report["skipped"] == 0
    assert report["examples"] == 3 and report["dropped_labels"] == {}


def test_release_contents_key_the_prepared_data(tmp_path, data_dir):
    """A changed release is prepared anew instead of silently reusing stale data."""
    folder = fx.write_release(str(tmp_path / "rel"))
    first = builder.prepare(folder, "bot", data_dir=str(tmp_path / "tfds"), num_workers=0)
    fx.write_release(folder, convos=(fx.CONVO_A,))
    os.utime(os.path.join(folder, "release_data_50.jsonl"), ns=(1, 1))
    second = builder.prepare(folder, "bot", data_dir=str(tmp_path / "tfds"), num_workers=0)
    assert first.data_dir != second.data_dir
    assert builder.num_examples(second, "train") == 2


def test_preparing_leaves_nothing_in_the_system_temporary_folder(tmp_path, release_dir, monkeypatch):
    """Preparing a release (both the first time and when reused) adds nothing to the system's
    temporary folder: TFDS's bucket lookup used to leave an empty folder there per preparation."""
    scratch = tmp_path / "system-tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    builder.prepare(release_dir, "bot", data_dir=str(tmp_path / "tfds"), num_workers=0)
    builder.prepare(release_dir, "bot", data_dir=str(tmp_path / "tfds"), num_workers=0)
    assert os.listdir(scratch) == []


def test_tarball_and_custom_policy(tmp_path, release_dir):
    """The builder reads the tarball, and a custom policy is its own config with its own data."""
    tarball = str(tmp_path / schema.TARBALL_NAME)
    sha = release.write_tarball(release_dir, tarball)
    policy = FeedbackPolicy(order=("like",))
    built = builder.prepare(tarball, "bot", data_dir=str(tmp_path / "tfds"), policy=policy, tarball_sha256=sha, num_workers=0)
    assert built.builder_config.name == f"bot-policy{policy.fingerprint()}"
    source = built.as_data_source("train")
    verdicts = sorted((r["label"], int(r["feedback"])) for r in (source[i] for i in range(len(source))))
    # Only likes count: B1 of A and Chatbot3 of C (liked+disliked) -> like rule needs no dislike.
    assert verdicts == [
        (b"hi! how are you?\r", schema.POSITIVE),
        (b"the moon is made of rock", schema.UNLABELED),
        (b"try Dune", schema.UNLABELED),
        (b"you are welcome", schema.UNLABELED),
    ]
    with pytest.raises(release.ReleaseError, match="checksum_mismatch"):
        builder.prepare(tarball, "bot", data_dir=str(tmp_path / "tfds2"), num_workers=0)


def test_malformed_release_fails_or_skips_in_the_builder(tmp_path):
    """The builder raises on a bad line by default and counts it with skip_malformed."""
    folder = fx.write_release(str(tmp_path / "rel"), extra_lines={7: [b"{not json"]})
    with pytest.raises(release.ReleaseError, match="release_data_07.jsonl:1: malformed_json"):
        builder.prepare(folder, "bot", data_dir=str(tmp_path / "a"), num_workers=0)
    built = builder.prepare(folder, "bot", data_dir=str(tmp_path / "b"), skip_malformed=True, num_workers=0)
    report = builder.split_report(built, "train")
    assert report["skipped_by_reason"] == {"malformed_json": 1}
    assert report["conversations_read"] == report["conversations_used"] + report["skipped"] == 3


def test_manual_download_instructions_name_the_release():
    """The instructions give the URL, the checksum and what to pass as manual_dir."""
    text = builder.Bb3xDeployment.MANUAL_DOWNLOAD_INSTRUCTIONS
    assert schema.RELEASE_URL in text and schema.TARBALL_SHA256 in text and "manual_dir" in text


def test_training_records_equal_tfds_decoding(release_dir, data_dir):
    """The fast proto reader returns exactly what tfds.data_source decodes for the training fields."""
    from bb3x_jax.data import records

    built = builder.prepare(release_dir, "human", data_dir=data_dir, num_workers=0)
    for split in ("train", "test"):
        slow = built.as_data_source(split)
        fast = records.TrainingRecords.of(built, split)
        assert len(fast) == len(slow)
        batch = fast.__getitems__(list(range(len(slow))))
        for i, record in enumerate(batch):
            reference = slow[i]
            assert record == {k: (int(reference[k]) if k == "feedback" else reference[k]) for k in records.FIELDS}
            assert fast[i] == record


def test_parallel_writer_equals_the_tfds_writer(tmp_path, monkeypatch):
    """Prepared with worker processes, every split holds the same records (as protos), in the same order."""
    from tensorflow_datasets.proto import tf_example_pb2

    from bb3x_jax.data import synthetic

    monkeypatch.setattr(builder, "PARALLEL_MIN_BYTES", 0)  # this small release would be parsed inline
    folder = str(tmp_path / "syn")
    synthetic.synthesize(folder, 400, seed=5)
    serial = builder.prepare(folder, "bot", data_dir=str(tmp_path / "a"), num_workers=0)
    parallel = builder.prepare(folder, "bot", data_dir=str(tmp_path / "b"), num_workers=2)
    for split in schema.SPLITS:
        a, b = serial.as_data_source(split).data_source, parallel.as_data_source(split).data_source
        assert len(a) == len(b) > 0
        parse = tf_example_pb2.Example.FromString
        assert [parse(r) for r in a.__getitems__(range(len(a)))] == [parse(r) for r in b.__getitems__(range(len(b)))]
        assert builder.split_report(serial, split) == builder.split_report(parallel, split)
    again = builder.prepare(folder, "bot", data_dir=str(tmp_path / "c"), num_workers=1)
    for split in schema.SPLITS:  # the parallel writer's files are byte-for-byte reproducible
        name = f"bb3x_deployment-{split}.array_record-00000-of-00001"
        assert open(os.path.join(parallel.data_dir, name), "rb").read() == open(os.path.join(again.data_dir, name), "rb").read()
    reopened = tfds.builder_from_directory(str(parallel.data_dir))
    assert reopened.info.splits["train"].num_examples == serial.info.splits["train"].num_examples


def test_record_serializer_matches_tfds_bytes(release_dir):
    """records.serialize gives the proto TFDS's serializer makes, in reproducible bytes."""
    from tensorflow_datasets.core import example_serializer
    from tensorflow_datasets.proto import tf_example_pb2

    from bb3x_jax.data import extract, records
    from bb3x_jax.data.feedback import DEFAULT_POLICY

    features = builder._features()
    reference = example_serializer.ExampleSerializer(features.get_serialized_info())
    location = release.locate_release(release_dir)
    count = 0
    for stream in ("bot", "human"):
        for split in schema.SPLITS:
            for _, example in extract.iter_examples(location, split, stream, DEFAULT_POLICY, extract.SplitReport()):
                ours = records.serialize(example)
                theirs = reference.serialize_example(features.encode_example(example))
                assert tf_example_pb2.Example.FromString(ours) == tf_example_pb2.Example.FromString(theirs)
                assert records.serialize(example) == ours
                count += 1
    assert count == 12


def test_a_release_below_the_size_threshold_is_parsed_without_worker_processes(release_dir, tmp_path, monkeypatch):
    """Spawning parser processes costs more than parsing a small release: below PARALLEL_MIN_BYTES none
    start even when asked for, from that size on they do; the prepared data is the same either way."""
    from bb3x_jax.data import parallel

    asked = []
    real_map = parallel.ordered_map

    def recording_map(*args, workers, **kwargs):
        asked.append(workers)
        return real_map(*args, workers=workers, **kwargs)

    monkeypatch.setattr(parallel, "ordered_map", recording_map)
    size = builder.release_bytes(release.locate_release(release_dir))
    monkeypatch.setattr(builder, "PARALLEL_MIN_BYTES", size + 1)
    inline = builder.prepare(release_dir, "bot", data_dir=str(tmp_path / "a"), num_workers=2)
    assert asked and set(asked) == {0}
    asked.clear()
    monkeypatch.setattr(builder, "PARALLEL_MIN_BYTES", size)
    parallel_built = builder.prepare(release_dir, "bot", data_dir=str(tmp_path / "b"), num_workers=2)
    assert asked and set(asked) == {2}
    for split in schema.SPLITS:
        assert builder.num_examples(inline, split) == builder.num_examples(parallel_built, split)

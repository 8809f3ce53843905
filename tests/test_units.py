"""Pure pieces of the daemon: config layering, identity files, backoff, rendering."""

from __future__ import annotations

import json
import random
import stat

import pytest

from knexa.cli.render import ago, human_bytes, short_id
from knexa.net.backoff import Backoff
from knexa.net.failures import failure_reason
from knexa.net.identity import (
    KEY_FILE,
    IdentityError,
    PeerIdError,
    load_or_create_identity,
    parse_peer_id,
    peer_id_of,
    public_key_from_peer_id,
)
from knexa.net.peers import PeerConnection, PeerTable, connection_kind
from knexa.node.config import DTYPES as CONFIG_DTYPES
from knexa.node.config import ConfigError, load_config
from knexa.node.errors import describe, find_exception
from knexa.node.kvshare.settings import KvShareSettings
from knexa.node.paths import write_json_atomically


def test_identity_is_created_private_and_reused(tmp_path):
    first = load_or_create_identity(tmp_path)
    mode = stat.S_IMODE((tmp_path / KEY_FILE).stat().st_mode)
    assert mode == 0o600
    second = load_or_create_identity(tmp_path)
    assert peer_id_of(first) == peer_id_of(second)
    assert public_key_from_peer_id(peer_id_of(first)).to_bytes() == first.public_key.to_bytes()


@pytest.mark.parametrize(
    "content", [b"", b"not a key", b"knexa-ed25519-v1\nzz", b"knexa-ed25519-v1\n" + b"00" * 31, b"\xff\xfe"]
)
def test_corrupted_identity_is_a_clear_error(tmp_path, content):
    (tmp_path / KEY_FILE).write_bytes(content)
    with pytest.raises(IdentityError, match="corrupted"):
        load_or_create_identity(tmp_path)


def test_peer_ids_parse_only_when_well_formed(tmp_path):
    own = peer_id_of(load_or_create_identity(tmp_path))
    assert parse_peer_id(own.to_base58()) == own
    rsa_style = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"  # a sha2-256 multihash id
    assert parse_peer_id(rsa_style).to_base58() == rsa_style
    # "garbage" is valid base58; a truncated or lengthened id is not a multihash
    for text in ("garbage", "", "0OIl", own.to_base58()[:-1], own.to_base58() + "a"):
        with pytest.raises(PeerIdError, match="not a peer id"):
            parse_peer_id(text)


def test_state_files_are_replaced_whole_and_leave_no_scratch(tmp_path):
    target = tmp_path / "state.json"
    write_json_atomically(target, {"a": 1})
    write_json_atomically(target, {"b": [2]}, indent=1)
    assert json.loads(target.read_text()) == {"b": [2]}
    with pytest.raises(TypeError):  # a value JSON cannot hold: the old file stays as it was
        write_json_atomically(target, {"c": object()})
    with pytest.raises(OSError):
        write_json_atomically(tmp_path / "missing" / "state.json", {})
    assert json.loads(target.read_text()) == {"b": [2]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_an_error_is_described_by_its_first_leaf_not_its_group():
    group = BaseExceptionGroup("Exceptions from Trio nursery", [
        ValueError("20 prompt tokens exceed the context"),
        BaseExceptionGroup("inner", [KeyError("x"), OSError("gone")]),
    ])
    assert describe(group) == "ValueError: 20 prompt tokens exceed the context (and 2 more)"
    assert describe(OSError("gone")) == "OSError: gone"


def test_config_layers_defaults_file_flags(tmp_path):
    (tmp_path / "config.toml").write_text(
        'listen = ["/ip4/127.0.0.1/tcp/5000"]\napi_port = 7800\nlog_level = "debug"\n'
    )
    config = load_config(data_dir=tmp_path, overrides={"api_port": 7900, "bootstrap": None})
    assert config.listen == ["/ip4/127.0.0.1/tcp/5000"]
    assert config.api_port == 7900
    assert config.log_level == "debug"
    assert config.api_host == "127.0.0.1"
    assert config.data_dir == tmp_path


def test_the_dtype_key_names_the_engines_dtypes(tmp_path):
    from knexa.node.engine.device import parse_dtype

    assert CONFIG_DTYPES[0] == "auto"
    for name in CONFIG_DTYPES[1:]:
        assert str(parse_dtype(name)) == f"torch.{name}"
    (tmp_path / "config.toml").write_text('dtype = "float32"\n')
    assert load_config(data_dir=tmp_path, overrides={}).dtype == "float32"
    assert load_config(data_dir=tmp_path, overrides={"dtype": "bfloat16"}).dtype == "bfloat16"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("api_port = 70000\n", "not a TCP port"),
        ('log_level = "loud"\n', "log_level"),
        ('bootstrap = ["/ip4/1.2.3.4/tcp/1"]\n', "/p2p/"),
        ('listen = ["nonsense"]\n', "invalid multiaddr"),
        ("ping_interval_s = 0\n", "positive"),
        ("listen = 5\n", "list of strings"),
        ("node = 5\n", "must be a table"),
        ('dht_mode = "relay"\n', "dht_mode"),
        ('model = "/no/such/folder"\n', "model"),
        ('device = "tpu"\n', "device"),
        ('dtype = "int4"\n', "dtype must be one of auto, float32, bfloat16, float16"),
        ("learn_public_validation = -1\n", "learn_public_validation"),
        ("learn_min_training_share = 1\n", "learn_min_training_share"),
        ("learn_teacher_votes = 0\n", "learn_teacher_votes must be in 1..15"),
        ('learn_transfer_file = "/no/such/transfer.jsonl"\n', "learn_transfer_file: cannot read"),
        ('learn_task_family = "easy"\n', "learn_task_family must be one of hard, learnable, not 'easy'"),
        ('kv_fetch = "sometimes"\n', "kv_fetch must be auto, always or never"),
        ("kv_block = 0\n", "kv_block must be positive"),
        ("kv_store_bytes = -1\n", "kv_store_bytes must be at least 0"),
        ("kv_lookup_timeout_s = 0\n", "kv_lookup_timeout_s must be positive"),
        ('kv_block = "64"\n', "kv_block must be an integer"),
    ],
)
def test_config_rejects_bad_values(tmp_path, text, message):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path, tmp_path)


def test_config_kv_keys_reach_the_prefix_sharing_settings(tmp_path):
    (tmp_path / "config.toml").write_text('[node]\nkv_store_bytes = 1048576\nkv_block = 32\nkv_fetch = "never"\n'
                                         "kv_lookup_timeout_s = 1\n")
    settings = load_config(data_dir=tmp_path).kvshare_settings()
    assert (settings.store_bytes, settings.block, settings.fetch) == (1 << 20, 32, "never")
    assert settings.lookup_timeout_s == 1.0 and isinstance(settings.lookup_timeout_s, float)
    assert settings.max_blocks == KvShareSettings.max_blocks  # unset keys keep the service's defaults


def test_missing_explicit_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.toml", tmp_path)


def test_backoff_grows_is_capped_and_resets():
    backoff = Backoff(initial=1, maximum=8, rng=random.Random(1))
    delays = [backoff.next_delay() for _ in range(8)]
    assert 0.5 <= delays[0] <= 1
    assert all(4 <= d <= 8 for d in delays[4:])
    backoff.reset()
    assert backoff.next_delay() <= 1


def test_peer_table_counts_each_peer_once():
    table = PeerTable()
    assert table.connected(PeerConnection("a", "/ip4/127.0.0.1/tcp/1", "direct", "inbound"))
    assert not table.connected(PeerConnection("a", "/ip4/127.0.0.1/tcp/2", "direct", "outbound"))
    assert len(table) == 1 and table.get("a").address.endswith("/1")
    assert table.disconnected("a") is not None
    assert table.disconnected("a") is None
    assert connection_kind("/ip4/1.2.3.4/tcp/1/p2p/X/p2p-circuit") == "relayed"
    assert connection_kind("/ip4/1.2.3.4/tcp/1") == "direct"


def test_rendering_helpers():
    assert short_id("12D3KooWEYqEuyb5RPmVZ5Ry3e4whsM4ho2SFJpAR31EmHGsJLWT") == "12D3Ko…GsJLWT"
    assert ago(100, now=105) == "5s"
    assert ago(0, now=3725) == "1h02m"
    assert human_bytes(512) == "512 B"
    assert human_bytes(1536) == "1.5 KiB"


def test_find_exception_looks_inside_groups():
    inner = OSError(98, "in use")
    group = ExceptionGroup("outer", [ValueError("x"), ExceptionGroup("inner", [inner])])
    assert find_exception(group, OSError) is inner
    assert find_exception(group, KeyError) is None


def test_failure_reason_digs_out_the_os_error():
    from libp2p.exceptions import MultiError

    refused = ConnectionRefusedError(111, "Connection refused")
    wrapper = RuntimeError("fail to open connection")
    wrapper.__cause__ = refused
    assert failure_reason(RuntimeError("dial failed")) == "dial failed"
    assert failure_reason(MultiError([wrapper])) == "connection refused"
    assert failure_reason(TimeoutError()) == "timed out"

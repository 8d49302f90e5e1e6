"""Cache keys and the fan-out of n samples, without a model: the key names the weights a
block's KV was computed under (the base, or one adapter version), never less."""

from __future__ import annotations

from dataclasses import dataclass

from loraplex.engine.request import Request, SamplingParams, sample_seed
from loraplex.engine.samples import cache_key, fan_out


@dataclass
class Spec:
    content_hash: str


@dataclass
class Version:
    """Stands in for an AdapterVersion: the fields a cache key reads."""

    adapter_id: str
    version: int
    spec: Spec


def test_a_cache_key_names_the_base_or_one_adapter_version() -> None:
    v1 = Version("acme/a", 1, Spec("h1"))
    keys = {
        cache_key(None, True, 1),
        cache_key(v1, True, 1),
        cache_key(Version("acme/b", 1, Spec("h1")), True, 1),  # another id, the same files
        cache_key(Version("acme/a", 2, Spec("h1")), True, 1),  # the same files loaded again after an unload
        cache_key(Version("acme/a", 1, Spec("h2")), True, 1),  # other files
    }
    assert len(keys) == 5
    assert cache_key(v1, True, 1) == cache_key(Version("acme/a", 1, Spec("h1")), True, 4)  # the same version


def test_with_prefix_caching_off_only_the_samples_of_one_request_share() -> None:
    v1 = Version("acme/a", 1, Spec("h1"))
    assert cache_key(v1, False, 1) is None and cache_key(None, False, 1) is None
    assert cache_key(v1, False, 2) != cache_key(v1, False, 2)  # a key for this request alone
    assert cache_key(v1, False, 2) not in (cache_key(v1, True, 2), cache_key(None, True, 2))


def test_samples_share_the_request_and_take_seed_plus_index() -> None:
    params = SamplingParams(n=3, seed=2**63 - 2, temperature=1.0)
    leader = Request("r", [1, 2, 3], params, adapter_id="x", cache_key="k")
    made: list[object] = []
    samples = fan_out(leader, lambda: made.append(object()) or made[-1])
    assert samples[0] is leader and [s.index for s in samples] == [0, 1, 2]
    assert [s.params.seed for s in samples] == [2**63 - 2, 2**63 - 1, 0]  # (s + i) mod 2**63
    assert [s.params.seed for s in samples] == [sample_seed(params.seed, i) for i in range(3)]
    assert all(s.request_id == "r" and s.cache_key == "k" and s.adapter_id == "x" for s in samples)
    assert all(s.leader is leader for s in samples[1:]) and leader.leader is None
    assert len({id(s.detokenizer) for s in samples[1:]}) == 2 and len(made) == 2  # one each
    assert samples[1].output_token_ids is not samples[2].output_token_ids
    unseeded = fan_out(Request("u", [1], SamplingParams(n=2)), lambda: None)
    assert [s.params.seed for s in unseeded] == [None, None]  # each draws its own

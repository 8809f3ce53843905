"""Collaboration across real daemons on loopback, each serving a tiny random model: mixture of agents (with a
node killed mid-round), admission under overload, verification catching a cheater, weighted voting."""

from __future__ import annotations

import subprocess
import sys
from contextlib import AsyncExitStack
from pathlib import Path

import httpx
import pytest
import trio
from libp2p.peer.id import ID as PeerID

from knexa.net.rpc import ErrorCode, RpcError
from knexa.node.collab.moa import rank_peers
from knexa.node.collab.verify import VerifyPolicy
from knexa.node.collab.wire import METHOD_PROPOSE, ProposeCall, ProposeReply, retry_after_of
from knexa.node.inference_wire import GenerateParams, Message
from tests.conftest import api_get, p2p_addr, running_daemon, wait_for
from tests.engine_helpers import build_tiny_model

QUESTION = [{"role": "user", "content": "hello there"}]


MODEL_NAME = "tiny-collab"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    # A longer context than the shared tiny model's: aggregation prompts carry several answers.
    return str(build_tiny_model(tmp_path_factory.mktemp("honest") / MODEL_NAME, max_positions=2048))


@pytest.fixture(scope="module")
def cheater_model(tmp_path_factory) -> str:
    """Different weights under the same model name (the folder name is the model's name)."""
    return str(build_tiny_model(tmp_path_factory.mktemp("cheater") / MODEL_NAME, seed=7, max_positions=2048))


async def _ready(daemon) -> bool:
    return (await api_get(daemon, "/v1/engine")).json().get("state") == "ready"


async def _sees_models(daemon, others) -> bool:
    profiles = daemon.ledger.profiles()
    return all(profiles.get(o.peer_id) is not None and profiles[o.peer_id].models for o in others)


async def _start_mesh(stack: AsyncExitStack, tmp_path: Path, models: list[str], shared: Path) -> list:
    """Daemons that each bootstrap to all earlier ones (a full mesh), engines ready, profiles seen."""
    daemons: list = []
    for i, model in enumerate(models):
        daemon = await stack.enter_async_context(
            running_daemon(tmp_path / f"n{i}", [p2p_addr(d) for d in daemons], model=model, cache_dir=shared)
        )
        daemons.append(daemon)
        # One load at a time: the first engine of a model folder times float32 against bfloat16 and records
        # its choice in the shared cache; loading together, each would time its own, under contention, and
        # honest nodes could run different dtypes (whose greedy outputs may differ at near-ties).
        if daemon.inference is not None:
            await wait_for(lambda d=daemon: _ready(d), 60)
    for d in daemons:
        others = [o for o in daemons if o is not d and o.inference is not None]
        await wait_for(lambda d=d, others=others: _sees_models(d, others), 30)
    return daemons


async def _post(daemon, path: str, body: dict) -> httpx.Response:
    async with httpx.AsyncClient(base_url=daemon.api_url, timeout=120) as client:
        return await client.post(path, json=body, headers={"Authorization": f"Bearer {daemon.api_token}"})


async def test_moa_round_k2_m2_completes_and_survives_a_node_killed_mid_round(tmp_path, tiny_model):
    shared = tmp_path / "shared-cache"
    async with AsyncExitStack() as stack:
        origin, *others = await _start_mesh(stack, tmp_path, [tiny_model] * 3, shared)
        # The fourth node runs in a scope of its own, so that the test can kill it alone.
        victim_scope = trio.CancelScope()
        nursery = await stack.enter_async_context(trio.open_nursery())

        async def run_victim(task_status=trio.TASK_STATUS_IGNORED) -> None:
            with victim_scope:
                async with running_daemon(
                    tmp_path / "victim", [p2p_addr(d) for d in [origin, *others]], model=tiny_model, cache_dir=shared
                ) as victim:
                    task_status.started(victim)
                    await trio.sleep_forever()

        victim = await nursery.start(run_victim)
        await wait_for(lambda: _ready(victim), 60)
        await wait_for(lambda: _sees_models(origin, [*others, victim]), 30)

        # A whole round through the local API.
        body = {"mode": "moa", "messages": QUESTION, "k": 2, "m": 2, "max_tokens": 8, "deadline_s": 60}
        response = await _post(origin, "/v1/collab/ask", body)
        assert response.status_code == 200, response.text
        result = response.json()
        assert result["k"] == 2 and result["m"] == 2 and not result["degraded"]
        assert origin.peer_id in result["contributors"] and len(result["contributors"]) == 3
        layers = {(c["peer_id"], c["layer"]) for c in result["contributions"]}
        assert {layer for _, layer in layers} == {0, 1} and len(layers) == 6
        assert result["aggregator"] == origin.peer_id and result["text"]

        # The same from the command line.
        ask = await _cli(origin, "ask", "--collab", "moa", "-k", "2", "-M", "1", "--max-tokens", "6", "hello there")
        assert ask.returncode == 0, ask.stderr
        assert ask.stdout.strip() and "mixture of agents K=2 M=1" in ask.stderr and "contributors" in ask.stderr
        bad = await _cli(origin, "ask", "--collab", "nope", "hello")
        assert bad.returncode == 2 and bad.stderr.startswith("error: --collab must be moa, vote or kv")

        # Again; the victim dies while computing its layer-1 answer. The origin is made to pick the victim and
        # others[0] (lowest load), so others[1] is the spare that must take the victim's place.
        origin.collab.candidates = _prefer(origin.collab.candidates, victim.peer_id, others[0].peer_id)
        killed = trio.Event()
        run_job = victim.collab.run_job

        async def dying_run_job(messages, params, *, force=False):
            if "Other assistants answered" in messages[-1]["content"]:
                killed.set()
                await trio.sleep_forever()  # the daemon is cancelled around this call
            return await run_job(messages, params, force=force)

        victim.collab.run_job = dying_run_job
        # This round tests failure handling: the origin must not lower M on its own load (the CPU is shared
        # by four nodes), or no layer 2 would come to kill the victim in.
        origin.collab.admission.enabled = False

        async def kill_when_hit() -> None:
            await killed.wait()
            victim_scope.cancel()

        nursery.start_soon(kill_when_hit)
        with trio.fail_after(90):
            result = await origin.collab.ask_moa(QUESTION, 2, 2, GenerateParams(max_new_tokens=8), 30.0)
        assert killed.is_set() and result["m"] == 2, result
        missed = [(x["peer_id"], x["layer"]) for x in result["missed"]]
        assert (victim.peer_id, 1) in missed
        assert result["replaced"] == {victim.peer_id: others[1].peer_id}
        layer1 = {c["peer_id"] for c in result["contributions"] if c["layer"] == 1}
        assert layer1 == {origin.peer_id, others[0].peer_id, others[1].peer_id}
        assert set(result["contributors"]) == {origin.peer_id, victim.peer_id, *(o.peer_id for o in others)}
        assert result["text"]

        # A peer that hangs (alive, never answering) is left out at the layer deadline, not waited for.
        async def hung_run_job(messages, params, *, force=False):
            await trio.sleep_forever()

        others[1].collab.run_job = hung_run_job
        origin.collab.candidates = _prefer(origin.collab.candidates, others[0].peer_id, others[1].peer_id)
        result = await origin.collab.ask_moa(QUESTION, 2, 1, GenerateParams(max_new_tokens=8), 3.0)
        assert (others[1].peer_id, 0, "deadline") in [(x["peer_id"], x["layer"], x["reason"]) for x in result["missed"]]
        assert set(result["contributors"]) == {origin.peer_id, others[0].peer_id} and result["text"]

        # Under load the origin lowers K first, then M, then refuses with a retry-after. Its measured service
        # time and recent rounds are set here (the pure rule's exact steps are unit-tested).
        del others[1].collab.run_job  # not hung any more
        admission = origin.collab.admission
        admission.enabled = True
        admission.service.mean_s = 0.1  # alpha; the 2 s window then holds this round and the 2 before it
        admission.started_rounds.times.clear()
        for _ in range(2):
            admission.started_rounds.add(trio.current_time())
        body = {"mode": "moa", "messages": QUESTION, "k": 2, "m": 2, "max_tokens": 4, "deadline_s": 30}
        response = await _post(origin, "/v1/collab/ask", body)
        assert response.status_code == 200, response.text
        lowered = response.json()
        assert lowered["degraded"] and (lowered["k"], lowered["m"]) < (2, 2)
        assert lowered["m"] == 2 or lowered["k"] == 1  # M only drops once K is down to 1
        admission.service.mean_s = 0.1
        for _ in range(30):
            admission.started_rounds.add(trio.current_time())
        refused = await _post(origin, "/v1/collab/ask", body)
        assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
        assert "overloaded" in refused.json()["detail"]
        nursery.cancel_scope.cancel()


async def _cli(daemon, *args: str) -> subprocess.CompletedProcess:
    """The real CLI in a subprocess, talking to the daemon's local API."""
    command = [sys.executable, "-m", "knexa.cli.main", *args, "--api", daemon.api_url, "--token", daemon.api_token]
    done = await trio.run_process(command, capture_stdout=True, capture_stderr=True, check=False)
    return subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode(), done.stderr.decode())


def _prefer(candidates_of, first: str, second: str):
    """The origin's candidates with `first` and `second` least loaded, so that K=2 picks exactly them."""
    from dataclasses import replace

    def candidates():
        out = []
        for c in candidates_of():
            load = 0 if c.peer_id in (first, second) else 5
            out.append(replace(c, queue_length=load))
        return out

    return candidates


async def _offer_load(client, worker, n: int, gap_s: float) -> dict:
    """Open-loop load: n propose calls from `client` to `worker`, one every gap_s, none waiting for another."""
    outcome = {"ok": 0, "overloaded": 0, "retry_after": [], "reasons": [], "max_queue": 0}
    call = ProposeCall(
        round_id="load", layer=0, messages=[Message(**QUESTION[0])], params=GenerateParams(max_new_tokens=32)
    )

    async def one() -> None:
        try:
            await client.rpc.call(
                PeerID.from_base58(worker.peer_id), METHOD_PROPOSE, call, timeout=120, response_model=ProposeReply
            )
            outcome["ok"] += 1
        except RpcError as exc:
            assert exc.code == ErrorCode.OVERLOADED, exc
            outcome["overloaded"] += 1
            outcome["retry_after"].append(retry_after_of(exc.message))
            outcome["reasons"].append(exc.message)

    async def watch_queue() -> None:
        while True:
            outcome["max_queue"] = max(outcome["max_queue"], worker.collab.admission.queue_length)
            await trio.sleep(0.005)

    async with trio.open_nursery() as watcher:
        watcher.start_soon(watch_queue)
        async with trio.open_nursery() as calls:
            for _ in range(n):
                calls.start_soon(one)
                await trio.sleep(gap_s)
        watcher.cancel_scope.cancel()
    return outcome


async def test_admission_keeps_the_queue_bounded_at_one_and_a_half_times_capacity(tmp_path, tiny_model):
    shared = tmp_path / "shared-cache"
    async with running_daemon(tmp_path / "w", model=tiny_model, cache_dir=shared) as worker:
        async with running_daemon(tmp_path / "c", [p2p_addr(worker)]) as client:
            await wait_for(lambda: _ready(worker), 60)
            # Malformed jobs get clear errors, and the node keeps serving.
            worker_id = PeerID.from_base58(worker.peer_id)
            bad_role = ProposeCall(round_id="r", layer=0, messages=[Message(role="wizard", content="hi")])
            with pytest.raises(RpcError) as refused:
                await client.rpc.call(worker_id, METHOD_PROPOSE, bad_role, timeout=30, response_model=ProposeReply)
            assert refused.value.code == ErrorCode.BAD_REQUEST and "role" in refused.value.message
            with pytest.raises(RpcError) as garbage:
                await client.rpc.call(worker_id, METHOD_PROPOSE, {"layer": "x"}, timeout=30)
            assert garbage.value.code == ErrorCode.BAD_REQUEST
            admission = worker.collab.admission
            assert admission.queue_length == 0
            # The service time: the median of sequential jobs' own running times.
            call = ProposeCall(round_id="r", layer=0, messages=[Message(**QUESTION[0])],
                               params=GenerateParams(max_new_tokens=32))
            times = []
            for _ in range(9):
                reply = await client.rpc.call(worker_id, METHOD_PROPOSE, call, timeout=30, response_model=ProposeReply)
                times.append(reply.service_time_s)
            alpha = sorted(times)[4]
            assert alpha > 0 and admission.alpha_s > 0
            gap = alpha / 1.5  # offered load 1.5 times what one server can do
            n = max(40, int(3 * admission.window_s / gap))  # long enough for the rate rule, not only the cap

            admission.max_queue_seen = 0
            controlled = await _offer_load(client, worker, n, gap)
            assert controlled["overloaded"] > 0 and controlled["ok"] > 0
            assert admission.max_queue_seen <= admission.max_queue
            assert all(r is not None and r > 0 for r in controlled["retry_after"])
            assert any("utilisation" in reason for reason in controlled["reasons"])  # the alpha*lambda rule acted
            stats = (await api_get(worker, "/v1/collab")).json()
            assert stats["rejected"] >= controlled["overloaded"]

            # The same load with admission off: the queue grows past the bound (what the control prevents).
            await wait_for(lambda: admission.queue_length == 0, 60)
            admission.enabled = False
            admission.max_queue_seen = 0
            uncontrolled = await _offer_load(client, worker, n, gap)
            # Only the RPC layer's own cap (64 calls in flight per peer) refuses anything now.
            assert all("too many concurrent calls" in reason for reason in uncontrolled["reasons"])
            assert admission.max_queue_seen > admission.max_queue
            assert uncontrolled["max_queue"] > controlled["max_queue"]


async def test_verification_catches_a_cheater_and_never_flags_honest_nodes(tmp_path, tiny_model, cheater_model):
    shared = tmp_path / "shared-cache"
    async with AsyncExitStack() as stack:
        verifier, honest_a, honest_b, cheater = await _start_mesh(
            stack, tmp_path, [tiny_model, tiny_model, tiny_model, cheater_model], shared
        )
        assert verifier.collab.own_model() == cheater.collab.own_model()  # same name, different weights
        dtypes = {d.inference.status()["dtype"] for d in (verifier, honest_a, honest_b)}
        assert len(dtypes) == 1
        verifier.collab.settings.verify = VerifyPolicy(fraction=1.0)
        params = GenerateParams(max_new_tokens=12)

        async def ask(peer, question) -> None:
            # A node kept busy back to back is at rho ~1 and may refuse: wait its retry-after, as a client does.
            while True:
                try:
                    await verifier.collab.ask_peer(peer.peer_id, "r", 0, question, params, 30)
                    return
                except RpcError as exc:
                    assert exc.code == ErrorCode.OVERLOADED, exc
                    await trio.sleep(retry_after_of(exc.message) or 0.1)

        # Other weights under the same name, honestly declared (its fingerprint: weights, tokenizer, dtype):
        # not checked, so never flagged for answering as its own model does.
        assert verifier.collab.own_fingerprint() != cheater.collab.own_fingerprint()
        for i in range(3):
            await ask(cheater, [{"role": "user", "content": f"question {i}"}])
        assert cheater.peer_id not in verifier.collab.tallies and verifier.collab.verify_counters.checks == 0
        # The cheater now claims the verifier's model while it runs its own (a real one would patch its code).
        cheater.collab.own_fingerprint = verifier.collab.own_fingerprint
        for i in range(25):
            for peer in (honest_a, honest_b):
                await ask(peer, [{"role": "user", "content": f"question {i}: tell me about {peer.peer_id[-4:]}"}])
        for i in range(5):
            await ask(cheater, [{"role": "user", "content": f"question {i}"}])
        await wait_for(lambda: verifier.collab.verify_counters.checks == 55, 60)
        tallies = verifier.collab.tallies
        assert tallies[honest_a.peer_id].failed == tallies[honest_b.peer_id].failed == 0
        assert tallies[honest_a.peer_id].checked + tallies[honest_b.peer_id].checked == 50
        assert tallies[cheater.peer_id].checked == tallies[cheater.peer_id].failed == 5
        assert verifier.collab.verify_counters.skipped == 0

        # The signed report reaches every node's ledger and the cheater's reputation drops there.
        for daemon in (verifier, honest_a, honest_b, cheater):
            await wait_for(lambda d=daemon: d.ledger.reputation(cheater.peer_id).score < 0.4, 30)
            assert daemon.ledger.reputation(honest_a.peer_id).score >= 0.5
        assert verifier.ledger.reports_about(cheater.peer_id)[verifier.peer_id].score == 0.0
        # ... and peer selection leaves the cheater out.
        ranked = [c.peer_id for c in rank_peers(verifier.collab.candidates(), verifier.collab.rng)]
        assert cheater.peer_id not in ranked and set(ranked) == {honest_a.peer_id, honest_b.peer_id}
        status = (await api_get(verifier, "/v1/node")).json()["collab"]["verification"]
        assert status["checks"] == 55 and status["failures"] == 5
        metrics = (await api_get(verifier, "/metrics")).text
        assert "knexa_verify_failures_total 5.0" in metrics


async def test_weighted_vote_outvotes_the_wrong_node(tmp_path, tiny_model, cheater_model):
    shared = tmp_path / "shared-cache"
    async with AsyncExitStack() as stack:
        origin, right_a, right_b, wrong = await _start_mesh(
            stack, tmp_path, ["none", tiny_model, tiny_model, cheater_model], shared
        )
        # The wrong node claims the best-matching skills: picking the top scorer alone would be wrong.
        right_a.collab.settings.skills = {"math": 0.9, "code": 0.3}
        right_b.collab.settings.skills = {"math": 0.6, "code": 0.6}
        wrong.collab.settings.skills = {"math": 1.0}
        prompt = [{"role": "user", "content": "What is the capital of France?"}]
        params = GenerateParams(max_new_tokens=12)
        right = await right_a.collab.run_job(prompt, params)
        response = await _post(origin, "/v1/collab/ask", {
            "mode": "vote", "messages": prompt, "requirement": {"math": 1.0}, "executors": 3, "max_tokens": 12,
        })
        assert response.status_code == 200, response.text
        result = response.json()
        bids = {b["peer_id"]: b["score"] for b in result["bids"]}
        assert max(bids, key=bids.get) == wrong.peer_id
        from knexa.node.collab.vote import final_answer

        assert final_answer(right.text) is not None
        assert result["answer"] == final_answer(right.text) and result["text"] == right.text
        assert set(result["supporters"]) == {right_a.peer_id, right_b.peer_id}
        ballots = {b["peer_id"]: b["answer"] for b in result["ballots"]}
        assert ballots[wrong.peer_id] != result["answer"]
        vote = await _cli(origin, "ask", "--collab", "vote", "--require", "math=1", "--max-tokens", "12",
                          "What is the capital of France?")
        assert vote.returncode == 0, vote.stderr
        assert vote.stdout.strip() == right.text.strip() and "weighted vote" in vote.stderr
        status = await _cli(origin, "status")
        assert status.returncode == 0 and "collab" in status.stdout and "verified" in status.stdout


async def test_collab_bad_input_and_no_peers(tmp_path):
    async with running_daemon(tmp_path / "alone") as alone:
        response = await _post(alone, "/v1/collab/ask", {"mode": "moa", "messages": QUESTION})
        assert response.status_code == 503 and "no_peers" in response.text
        response = await _post(alone, "/v1/collab/ask", {"mode": "moa", "messages": QUESTION, "k": 0})
        assert response.status_code == 422
        response = await _post(alone, "/v1/collab/ask", {"mode": "vote", "messages": QUESTION})
        assert response.status_code == 503
        stats = (await api_get(alone, "/v1/collab")).json()
        assert stats["queue_length"] == 0 and stats["verification"]["checks"] == 0


async def test_peers_known_only_from_the_ledger_take_part_and_a_dead_one_is_skipped(tmp_path, tiny_model):
    """A chain far - near - origin: the origin is connected to `near` only and knows `far` from the
    replicated ledger; a round still reaches `far` (the RPC layer dials it through the DHT). Once `far` has
    crashed, a vote goes on without it, and it is not dialled again for a while."""
    shared = tmp_path / "shared-cache"
    async with AsyncExitStack() as stack:
        nursery = await stack.enter_async_context(trio.open_nursery())
        far_scope = trio.CancelScope()

        async def run_far(task_status=trio.TASK_STATUS_IGNORED) -> None:
            with far_scope:
                async with running_daemon(tmp_path / "far", model=tiny_model, cache_dir=shared) as far:
                    task_status.started(far)
                    await trio.sleep_forever()

        far = await nursery.start(run_far)
        await wait_for(lambda: _ready(far), 60)
        near = await stack.enter_async_context(
            running_daemon(tmp_path / "near", [p2p_addr(far)], model=tiny_model, cache_dir=shared))
        await wait_for(lambda: _ready(near), 60)
        origin = await stack.enter_async_context(running_daemon(tmp_path / "origin", [p2p_addr(near)]))
        await wait_for(lambda: _sees_models(origin, [far, near]), 30)

        # DHT lookups connect the nodes of a small mesh (a large one would not be): close that link, until the
        # DHT leaves it closed.
        async def unlinked() -> bool:
            if far.peer_id in {p.peer_id for p in origin.mesh.peers()}:
                await origin.host.disconnect(PeerID.from_base58(far.peer_id))
                return False
            return True

        await wait_for(unlinked, 20)
        # Read at once, with no await in between: a lookup may link them again any time after.
        candidates = {c.peer_id: c.connected for c in origin.collab.candidates()}
        known = origin.known_peers_view()
        assert candidates == {far.peer_id: False, near.peer_id: True}
        assert [k["peer_id"] for k in known] == [far.peer_id] and known[0]["profile"]["models"] == [MODEL_NAME]
        # `knexa-node peers` lists it below the connected ones (from the API's "known").
        shown = await _cli(origin, "peers")
        assert shown.returncode == 0, shown.stderr
        if far.peer_id not in {p.peer_id for p in origin.mesh.peers()}:
            assert "1 peer(s) connected" in shown.stdout
            assert "1 more in the ledger, not connected" in shown.stdout

        body = {"mode": "moa", "messages": QUESTION, "k": 2, "m": 1, "max_tokens": 6, "deadline_s": 60}
        response = await _post(origin, "/v1/collab/ask", body)
        assert response.status_code == 200, response.text
        assert set(response.json()["contributors"]) == {far.peer_id, near.peer_id}
        assert far.peer_id in {p.peer_id for p in origin.mesh.peers()}  # dialled for the round

        # Cancelled in-process with no goodbye, as a crash: its profile is not retracted (a clean stop by
        # signal retracts it, see test_cli).
        far_scope.cancel()
        await wait_for(lambda: far.peer_id not in {p.peer_id for p in origin.mesh.peers()}, 30)
        vote = {"mode": "vote", "messages": QUESTION, "requirement": {"math": 1.0}, "executors": 2,
                "max_tokens": 6, "deadline_s": 30}
        response = await _post(origin, "/v1/collab/ask", vote)
        assert response.status_code == 200, response.text
        assert [b["peer_id"] for b in response.json()["bids"]] == [near.peer_id]
        # Its profile lives on in the ledger until it expires, but it is not dialled again for a while.
        assert far.peer_id not in {c.peer_id for c in origin.collab.candidates()}


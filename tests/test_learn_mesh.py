"""Learning together across 4 real daemons on loopback, each with a tiny random model and its own private
toy data: a full distillation round, serving during training, nothing private on the wire, hostile transfers
and forged rewards refused, and a matchmaker that dies without stopping the rounds."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import trio
from libp2p.peer.id import ID as PeerID

from knexa.crdt.ledger import Ledger
from knexa.crdt.namespace import learn_key
from knexa.crdt.validation import RejectReason
from knexa.net.rpc import ErrorCode, RpcError, sign_payload
from knexa.net.rpc.wire import FramedStream
from knexa.node.engine import GenerationRequest, SamplingParams
from knexa.node.learn import tasks
from knexa.node.learn.errors import LearnError
from knexa.node.learn.rounds import MatchmakerState, RewardReport, next_plan, transfer_seed_of
from knexa.node.learn.settings import LearnSettings
from knexa.node.learn.wire import METHOD_TRANSFER, TRANSFER_TOPIC, TransferCall, TransferReply, TransferSet
from tests.conftest import p2p_addr, running_daemon, wait_for
from tests.crdt_helpers import KEY_PAIRS
from tests.engine_helpers import build_tiny_model

LEARN = dict(
    learn_round_interval_s=2.0, learn_round_deadline_s=25.0, learn_takeover_s=2.0, learn_member_ttl_s=6.0,
    learn_transfer_prompts=4, learn_max_tokens=8, learn_local_steps=6, learn_round_steps=6,
    learn_latency_target_s=10.0,
)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    return str(build_tiny_model(tmp_path_factory.mktemp("learn") / "tiny-learn"))


def private_answer(node: int, row: int) -> str:
    return f"zq{node}x{row}kept"


def write_data(path: Path, node: int) -> Path:
    rows = [{"prompt": f"What is the code word {row}?", "answer": private_answer(node, row),
             "category": ("arithmetic", "units", "strings", "dates")[(node + row) % 4]} for row in range(8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


async def knexa_node(daemon, *args: str) -> subprocess.CompletedProcess:
    """The `knexa-node` CLI in its own process, pointed at an in-process daemon's API."""
    done = await trio.run_process(
        [sys.executable, "-m", "knexa.cli.main", *args, "--api", daemon.api_url, "--token", daemon.api_token],
        capture_stdout=True, capture_stderr=True, check=False,
    )
    return subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode(), done.stderr.decode())


class Node:
    """A daemon in its own cancel scope, so that a test can kill one node of the mesh."""

    def __init__(self) -> None:
        self.daemon = None
        self.scope = trio.CancelScope()

    async def run(self, data_dir: Path, bootstrap: list[str], model: str, cache: Path, settings: dict,
                  task_status=trio.TASK_STATUS_IGNORED) -> None:
        with self.scope:
            async with running_daemon(data_dir, bootstrap, model=model, cache_dir=cache,
                                      **{**LEARN, **settings}) as daemon:
                self.daemon = daemon
                task_status.started()
                await trio.sleep_forever()


async def post(daemon, path: str, body: dict) -> httpx.Response:
    async with httpx.AsyncClient(base_url=daemon.api_url, timeout=120) as client:
        return await client.post(path, json=body, headers={"Authorization": f"Bearer {daemon.api_token}"})


async def start_mesh(nursery: trio.Nursery, tmp_path: Path, model: str, steps: list[int], **settings) -> list[Node]:
    nodes: list[Node] = []
    for i, n_steps in enumerate(steps):
        node = Node()
        await nursery.start(node.run, tmp_path / f"n{i}", [p2p_addr(n.daemon) for n in nodes], model,
                            tmp_path / "cache", {**settings, "learn_local_steps": n_steps})
        await wait_for(lambda d=node.daemon: d.inference.status()["state"] == "ready", 60)
        nodes.append(node)
    return nodes


def history(daemon) -> list[dict]:
    return daemon.learn.rounds_view()["history"]


async def test_a_round_runs_while_serving_and_nothing_private_goes_on_the_wire(tmp_path, tiny_model, monkeypatch):
    sent: list[bytes] = []
    original = FramedStream.send_raw

    async def recording(self, data: bytes) -> None:  # every plaintext RPC frame, before Noise
        sent.append(bytes(data))
        await original(self, data)

    monkeypatch.setattr(FramedStream, "send_raw", recording)
    # A given public transfer set (prompts only): teachers answer its prompts, never the answers beside them.
    given = tmp_path / "transfer.jsonl"
    given.write_text("".join(json.dumps({"prompt": f"Name the public colour {i}.", "answer": "zqgivenkept"}) + "\n"
                             for i in range(6)))
    async with trio.open_nursery() as nursery:
        nodes = await start_mesh(nursery, tmp_path, tiny_model, [2000, 6, 6, 6], learn_transfer_file=str(given))
        daemons = [n.daemon for n in nodes]
        busy = daemons[0]
        # Serving during training: node 0 trains for 2000 steps; a request sent meanwhile is answered.
        response = await post(busy, "/v1/learn", {"data": str(write_data(tmp_path / "d0.jsonl", 0))})
        assert response.status_code == 200 and response.json()["started"]
        assert response.json()["phase"] == "training" and response.json()["examples"]["train"] > 0
        again = await post(busy, "/v1/learn", {"data": str(tmp_path / "d0.jsonl")})
        assert again.status_code == 409 and "already training" in again.text
        engine = busy.inference.require_engine()
        await wait_for(lambda: engine.status()["training"] is not None, 60)
        answer = await engine.generate(GenerationRequest(prompt="hello", params=SamplingParams(max_new_tokens=4),
                                                         adapter="learned"))
        assert answer.token_ids and engine.status()["training"] is not None  # answered with training under way
        for i, daemon in enumerate(daemons[1:], start=1):
            response = await post(daemon, "/v1/learn", {"data": str(write_data(tmp_path / f"d{i}.jsonl", i)),
                                                        "wait": True})
            assert response.status_code == 200, response.text
            assert response.json()["phase"] == "enrolled"
            # Toy data of the task family: the shared validation set sits beside the node's own split.
            assert response.json()["examples"]["shared_validation"] == LearnSettings.public_validation * len(
                tasks.CATEGORIES)
            skills = response.json()["skills"]
            assert skills and dict(daemon.own_profile().skills).items() >= skills.items()  # in its profile
        await wait_for(lambda: busy.learn.phase == "enrolled", 120)

        # A full round: planned by one node, every student reports, the next matchmaker closes it.
        await wait_for(lambda: any(len(h["rewards"]) == 2 for h in history(daemons[1])), 120)
        record = next(h for h in history(daemons[1]) if len(h["rewards"]) == 2)
        students = {p["student"] for p in record["pairs"]}
        assert len(record["pairs"]) == 2 and {r[0] for r in record["rewards"]} == students
        explained = daemons[1].learn.rounds_view(explain=True)["explain"]  # every pair of the 4 members, scored
        assert len(explained) == 6 and all(r["ucb"] == pytest.approx(r["mean"] + r["width"]) for r in explained)
        assert all(all(v > 0 for v in r["lead"].values()) for r in explained)
        # Every node checked each honest state against the one it followed before (and each plan's pairs
        # against its bandit), and refused none.
        assert not [r for d in daemons for r in d.learn.rejected if r.startswith(("matchmaker state", "plan", "pair"))]
        assert any(d.learn.states_checked for d in daemons)
        for daemon in daemons:
            if daemon.peer_id in students:
                reward = RewardReport.from_dict(daemon.ledger.learn_records("reward")[daemon.peer_id])
                # Promoted only when it validated better: more accurate, or as accurate with a lower loss.
                assert reward.swapped == (reward.gain > 0 or (reward.gain == 0 and reward.loss_drop > 0))
                if reward.round_no == record["round"]:  # the bandit was fed this student's loss drop
                    applied = next(r for r in record["rewards"] if r[0] == daemon.peer_id)
                    assert applied[2] == pytest.approx(reward.loss_drop)
                studied = [r for r in daemon.learn.log if r.role == "student" and "gain" in r.detail]
                assert studied and all(r.detail["swapped"] == (r.detail["gain"] > 0 or (
                    r.detail["gain"] == 0 and r.detail["loss_drop"] > 0)) for r in studied)

        # On the wire: no private answer, no byte run of any node's adapter weights.
        wire = b"".join(sent)
        assert b"Name the public colour" in wire and b"zqgivenkept" not in wire  # its prompts, answered
        for i, daemon in enumerate(daemons):
            for row in range(8):
                assert private_answer(i, row).encode() not in wire
            for entry in daemon.ledger.entries():
                assert b"kept" not in entry.payload
            lora = daemon.inference.require_engine()._worker.model.adapters.parameters_of("learned")
            for tensor in list(lora.values())[:4]:
                assert tensor.detach().float().cpu().numpy().tobytes()[:64] not in wire
        nursery.cancel_scope.cancel()


async def test_hostile_transfers_and_rewards_are_refused_and_a_dead_matchmaker_is_replaced(tmp_path, tiny_model):
    async with trio.open_nursery() as nursery:
        nodes = await start_mesh(nursery, tmp_path, tiny_model, [6, 6, 6, 6])
        daemons = [n.daemon for n in nodes]
        for i, daemon in enumerate(daemons):
            response = await post(daemon, "/v1/learn", {"data": str(write_data(tmp_path / f"d{i}.jsonl", i)),
                                                        "wait": True})
            assert response.status_code == 200, response.text
        await wait_for(lambda: all((s := d.learn.current_state()) is not None and len(s.plan.pairs) == 2
                                   for d in daemons), 60)
        by_id = {d.peer_id: d for d in daemons}

        def cast():
            """The open round, a pair of it, and the other pair's student (who does not teach this one), read
            afresh before each call: rounds here follow each other within seconds, and a transfer for a round
            that is over is refused for that reason."""
            plan = daemons[0].learn.current_state().plan
            pair, other = plan.pairs
            return plan, pair, by_id[pair.student], by_id[pair.teacher], by_id[other.student]

        async def send(sender, student, body: TransferCall) -> TransferReply:
            return await sender.rpc.call(PeerID.from_base58(student.peer_id), METHOD_TRANSFER, body, timeout=30,
                                         response_model=TransferReply)

        def signed(sender, student, transfer: TransferSet | bytes) -> bytes:
            body = transfer if isinstance(transfer, bytes) else transfer.to_bytes()
            return sign_payload(sender.key_pair, TRANSFER_TOPIC, body, recipient=PeerID.from_base58(student.peer_id))

        # A transfer from a node that is not this student's teacher (answering the round's public prompts).
        plan, pair, student, teacher, impostor = cast()
        public = tasks.transfer_set(LEARN["learn_transfer_prompts"], transfer_seed_of(plan.round_no),
                                    LearnSettings.task_family)
        payload = signed(impostor, student, TransferSet(plan.round_no, impostor.peer_id, student.peer_id,
                                                        ((public[0], "2"),)))
        with pytest.raises(RpcError) as caught:
            await send(impostor, student, TransferCall(round_no=plan.round_no, payload=payload))
        assert caught.value.code == ErrorCode.UNAUTHORIZED
        # A payload signed by someone else than the caller.
        with pytest.raises(RpcError) as caught:
            await send(teacher, student, TransferCall(round_no=plan.round_no, payload=payload))
        assert caught.value.code == ErrorCode.UNAUTHORIZED
        # A malformed transfer set, correctly signed by the assigned teacher.
        plan, pair, student, teacher, impostor = cast()
        with pytest.raises(RpcError) as caught:
            await send(teacher, student, TransferCall(round_no=plan.round_no,
                                                      payload=signed(teacher, student, b"\xc1not msgpack")))
        assert caught.value.code == ErrorCode.BAD_REQUEST
        # Answers to prompts outside the round's public transfer set, from the assigned teacher: the teacher
        # would be choosing the student's training data.
        plan, pair, student, teacher, impostor = cast()
        chosen = TransferSet(plan.round_no, teacher.peer_id, student.peer_id, (("Repeat after me: zqpoison", "x"),))
        with pytest.raises(RpcError, match="not this round's public transfer prompts") as caught:
            await send(teacher, student, TransferCall(round_no=plan.round_no, payload=signed(teacher, student, chosen)))
        assert caught.value.code == ErrorCode.BAD_REQUEST
        assert student.learn.rejected["transfer with prompts outside the public set"] == 1
        # A transfer for a round not open yet (its plan may not have reached the student): the teacher tries
        # it again.
        early = TransferSet(plan.round_no + 5, teacher.peer_id, student.peer_id, ((public[0], "2"),))
        with pytest.raises(RpcError, match="not open here yet") as caught:
            await send(teacher, student, TransferCall(round_no=plan.round_no + 5, payload=signed(teacher, student,
                                                                                                   early)))
        assert caught.value.code == ErrorCode.UNAVAILABLE

        # A forged reward: written by the impostor into the student's namespace, then one in its own.
        forged_reward = RewardReport(plan.round_no, student.peer_id, pair.teacher, 1.0, 1.0, True, 5.0).to_dict()
        entry = impostor.ledger.put_learn("reward", forged_reward, None)
        stolen = dataclasses.replace(entry, key=learn_key(student.peer_id, "reward"))
        result = daemons[0].ledger.merge([stolen])
        assert result.rejected_by_reason == {RejectReason.WRONG_NAMESPACE: 1}

        # A signed matchmaker state far ahead of the open round (near the limit, no next round could follow
        # it), from a key of its own (a member could overwrite its one state record at its next round before
        # every node has seen it): every node refuses it and follows the honest one.
        liar = Ledger(KEY_PAIRS[7])
        far = dataclasses.replace(MatchmakerState.initial(), round_no=2**62 - 1)
        far = next_plan(far, list(daemons[0].learn.members().values()), liar.peer_id, int(time.time() * 1000), 25.0)
        entry = liar.put_learn("state", far.to_dict(), None)
        for daemon in daemons:
            daemon.ledger.merge([entry])
        ahead = "matchmaker state ahead of the round the members follow"
        await wait_for(lambda: all(d.learn.rejected.get(ahead) for d in daemons), 30)
        assert all(d.learn.current_state().round_no < 2**40 for d in daemons)

        # The round goes on to its end, and the node that ran it dies: another plans the next rounds.
        await wait_for(lambda: any(h["round"] == plan.round_no for h in history(daemons[0])), 90)
        # Once it is over, a transfer for it is refused as such.
        await wait_for(lambda: student.learn.current_state().round_no > plan.round_no, 30)
        stale = TransferSet(plan.round_no, teacher.peer_id, student.peer_id, ((public[0], "2"),))
        with pytest.raises(RpcError, match="is over") as caught:
            await send(teacher, student, TransferCall(round_no=plan.round_no, payload=signed(teacher, student, stale)))
        assert caught.value.code == ErrorCode.BAD_REQUEST
        closing = daemons[0].learn.current_state()
        matchmaker = closing.plan.matchmaker
        victim = next(n for n in nodes if n.daemon.peer_id == matchmaker)
        victim.scope.cancel()
        survivors = [d for d in daemons if d.peer_id != matchmaker]

        def replaced() -> bool:
            s = survivors[0].learn.current_state()
            return (s is not None and s.round_no > closing.round_no and s.plan.matchmaker != matchmaker
                    and matchmaker not in {m for p in s.plan.pairs for m in (p.teacher, p.student)})

        await wait_for(replaced, 120)
        after = survivors[0].learn.current_state()
        assert after.bandit.updates >= closing.bandit.updates  # the learned state carried over
        assert after.history[-1].rewards  # rounds kept closing with rewards after the death

        # A user takes a node out of the rounds (`knexa-node learn --leave`, the real CLI): it keeps serving,
        # its membership is withdrawn from its peers' ledgers at once, and it no longer takes transfers.
        quitter, watcher = survivors[1], survivors[0]
        left = await knexa_node(quitter, "learn", "--leave")
        assert left.returncode == 0 and "left the distillation rounds" in left.stdout, left.stderr
        assert quitter.learn.phase == "idle" and quitter.peer_id not in watcher.ledger.learn_entries("member")
        again = await knexa_node(quitter, "learn", "--leave")
        assert again.returncode == 1 and "takes part in no rounds" in again.stderr
        both = await knexa_node(quitter, "learn", "--leave", "--data", "x.jsonl")
        assert both.returncode == 2 and "not both" in both.stderr and "Traceback" not in both.stderr
        shown = await knexa_node(quitter, "learn")  # neither: where learning stands
        assert shown.returncode == 0 and "phase: idle" in shown.stdout and "validation accuracy" in shown.stdout
        summary = await knexa_node(watcher, "status")
        assert summary.returncode == 0 and "enrolled, validation accuracy" in summary.stdout, summary.stdout
        rounds = await knexa_node(watcher, "rounds", "--explain")
        assert rounds.returncode == 0 and "distillation rounds" in rounds.stdout and "LinUCB scores" in rounds.stdout
        answer = await quitter.inference.require_engine().generate(GenerationRequest(
            prompt="hello", params=SamplingParams(max_new_tokens=2), adapter="learned"))
        assert answer.token_ids

        # A node that stops cleanly (SIGTERM, see test_cli) says goodbye first: its membership and profile
        # are withdrawn from its peers' ledgers at once, so no matchmaker pairs it while the records live on.
        leaving, staying = survivors[-1], survivors[0]
        await leaving.say_goodbye()
        assert leaving.learn.phase == "leaving"
        assert leaving.peer_id not in staying.ledger.learn_entries("member")
        assert leaving.peer_id not in staying.ledger.profiles()
        # Until the stop, neither the profile refresh nor a round that ends writes them back.
        leaving.ledger_service.refresh_profile()
        leaving.learn._write_member()
        assert leaving.peer_id not in leaving.ledger.profiles()
        assert leaving.peer_id not in leaving.ledger.learn_entries("member")
        with pytest.raises(LearnError, match="stopping"):
            await leaving.learn.learn(Path("unused.jsonl"))
        nursery.cancel_scope.cancel()


async def test_an_enrolled_node_rejoins_the_rounds_after_a_restart_until_it_leaves(tmp_path, tiny_model):
    data_dir, cache = tmp_path / "node", tmp_path / "cache"
    data = write_data(tmp_path / "d.jsonl", 0)

    async def one_life(check) -> None:
        async with running_daemon(data_dir, [], model=tiny_model, cache_dir=cache, **LEARN) as daemon:
            await check(daemon)

    async def enrol(daemon) -> None:
        await wait_for(lambda: daemon.inference.status()["state"] == "ready", 60)
        response = await post(daemon, "/v1/learn", {"data": str(data), "wait": True})
        assert response.status_code == 200 and response.json()["phase"] == "enrolled", response.text
        enrolled["accuracy"] = response.json()["accuracy"]

    async def rejoined(daemon) -> None:  # no `learn` call: the saved adapter, evaluated again, no training
        await wait_for(lambda: daemon.learn.phase == "enrolled", 60)
        status = daemon.learn.status()
        assert status["local_training"] is None and status["accuracy"] == enrolled["accuracy"]
        assert status["rejoined_after_restart"]
        shown = await knexa_node(daemon, "learn")
        assert "rejoined the rounds after a restart" in shown.stdout and "phase: enrolled" in shown.stdout
        assert daemon.peer_id in daemon.ledger.learn_entries("member")
        left = await knexa_node(daemon, "learn", "--leave")
        assert left.returncode == 0, left.stderr

    async def stays_out(daemon) -> None:
        await wait_for(lambda: daemon.inference.status()["state"] == "ready", 60)
        await trio.sleep(3 * LEARN["learn_round_interval_s"])
        assert daemon.learn.phase == "idle" and daemon.peer_id not in daemon.ledger.learn_entries("member")

    async def data_gone(daemon) -> None:  # the node serves on and says why it is not taking part
        await wait_for(lambda: daemon.learn.last_error is not None, 60)
        assert "could not rejoin" in daemon.learn.last_error and daemon.learn.phase == "idle"
        assert daemon.inference.status()["state"] == "ready"

    enrolled: dict = {}
    await one_life(enrol)
    await one_life(rejoined)
    await one_life(stays_out)
    await one_life(enrol)
    data.unlink()
    await one_life(data_gone)
    # A saved adapter that cannot be read (a save cut short) is moved aside, and learning starts afresh.
    saved = data_dir / "adapters" / "learned"
    saved.mkdir(parents=True, exist_ok=True)
    (saved / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "target_modules": ["q_proj"]}))
    (saved / "adapter_model.safetensors").write_bytes(b"cut short")
    write_data(data, 0)
    await one_life(enrol)
    assert [p.name.split("-")[0] for p in (data_dir / "adapters").iterdir() if p.name != "learned"] == [
        "learned.unreadable"]

"""The worker thread: the only place the model runs. It admits queued jobs between decode steps
(continuous batching), runs one batched decode step at a time, and recovers from model failures."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .batch import BatchLayout
from .config import EngineConfig
from .device import configure_threads
from .errors import (
    AdapterBusy,
    AdapterError,
    EngineClosed,
    EngineCrashed,
    EngineDown,
    EngineError,
    IncompatibleCache,
    InvalidRequest,
)
from .forward_cache import cache_kwargs, output_cache
from .generation import RowProgress
from .jobs import AdapterJob, AnswerLossJob, GenerateJob, Job, PrefillJob, ScoreJob, TrainJob
from .kv import check_import, export_cache
from .kvbatch import BatchCache, Pairs
from .modelstate import ModelState, load_model_state
from .queue import RequestQueue
from .requests import ScoreResult
from .sampler import new_generator, pick_tokens
from .stats import EngineStats
from .training import (
    TrainingPolicy,
    TrainingRun,
    answer_positions,
    collate,
    encode_example,
    row_losses,
    weighted_loss,
)

log = logging.getLogger("knexa.engine")

CRASH_WINDOW_S = 60.0
ONE_SHOTS_PER_STEP = 2


class InjectedFault(RuntimeError):
    """Raised inside a decode step by the test hook, standing in for a model crash."""


@dataclass(eq=False)
class Row:
    """A generation in the running batch."""

    job: GenerateJob
    progress: RowProgress
    generator: torch.Generator | None
    next_token: int  # sampled, not yet fed through the model
    # The adapter whose weights the row decodes with: the one it asked for, or a hidden copy of that one's
    # weights from when it started, if they were replaced (promoted over) since.
    weights: str | None


class Worker:
    def __init__(self, config: EngineConfig, queue: RequestQueue[Job]) -> None:
        self.config = config
        self.queue = queue
        self.stats = EngineStats()
        self.state = "loading"
        self.reason: str | None = None
        self.model: ModelState | None = None
        self.torch_threads = 0
        self.layout = BatchLayout(config.max_batch)
        self.rows: list[Row] = []
        self._batch: BatchCache | None = None
        self._taken: list[Job] = []  # admitted this round and not yet answered or started
        self._joining: list[tuple[Row, Pairs]] = []  # started (prefilled) but not yet in the batch
        self._crashes: deque[float] = deque()
        self._fault: tuple[str, bool] | None = None
        self._train_fault: str | None = None
        self.training: TrainingRun | None = None
        self._train_job: TrainJob | None = None
        self.last_training: dict[str, Any] | None = None  # how the last training ended, for status()
        self._last_decode_s = 0.0
        # Called in the worker thread after every state change; the engine forwards it to trio.
        self.on_state_change: Callable[[], None] = lambda: None
        self.thread = threading.Thread(target=self._main, name="knexa-engine", daemon=True)

    # Called from the trio side -----------------------------------------------------------------

    def inject_fault(self, message: str, out_of_memory: bool = False, during: str = "decode") -> None:
        if during == "training":
            self._train_fault = message
        else:
            self._fault = (message, out_of_memory)

    @property
    def active_rows(self) -> int:
        return len(self.rows)

    # The thread --------------------------------------------------------------------------------

    def _main(self) -> None:
        self.torch_threads = configure_threads(self.config.torch_threads)
        with torch.no_grad():
            try:
                self.model = load_model_state(self.config)
                self._batch = BatchCache(self.model.model.config)
                self._set_state("ready")
            except Exception as exc:  # any load failure leaves the engine down, the process alive
                self._go_down(f"model load failed: {type(exc).__name__}: {exc}")
            while True:
                if self.state == "down":
                    if not self._refuse_queued():
                        break
                    continue
                try:
                    if not self._round():
                        break
                except Exception as exc:  # the model failed: fail what is in flight, then recover
                    self._recover(exc)
        self._fail_in_flight(EngineClosed("the engine shut down"))
        # A closed engine lets go of its model at once, whoever still holds the engine object (a daemon
        # restarted in place leaves its old objects to the garbage collector): memory, a GPU's above all,
        # then need not hold the old model beside the new one.
        self.model, self._batch, self.training, self._train_job, self.rows = None, None, None, None, []
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _round(self) -> bool:
        """Admit new work, then run one decode step. False once the queue is closed."""
        if self.queue.closed:
            return False
        free = self.layout.free_rows
        if free:
            # Block only when idle; with rows in flight, just pick up whatever is already waiting.
            idle = not self.rows and self.training is None
            self._taken = self.queue.take(free, timeout_s=None if idle else 0)
        else:
            # A full batch still lets one-shot work (prefill, score, adapters) through between steps.
            self._taken = self.queue.take_where(lambda job: not isinstance(job, GenerateJob), ONE_SHOTS_PER_STEP)
        # Jobs leave _taken only once answered or started, so a crash midway fails exactly the rest.
        while self._taken:
            job = self._taken[0]
            if not job.reply.cancelled:
                try:
                    started = self._run_job(job)
                except EngineError as exc:
                    job.reply.send(exc)
                    started = None
                if started is not None:
                    self._joining.append(started)
            self._taken.pop(0)
        if self._joining:
            self._join(self._joining)
            self._joining = []
        if self.rows:
            self._decode_step()
        if self.training is not None:
            self._training_step()
        return True

    def _run_job(self, job: Job) -> tuple[Row, Pairs] | None:
        assert self.model is not None
        if isinstance(job, GenerateJob):
            return self._start_generation(job)
        if isinstance(job, PrefillJob):
            job.reply.send(self._prefill(job))
        elif isinstance(job, ScoreJob):
            job.reply.send(self._score(job))
        elif isinstance(job, AnswerLossJob):
            job.reply.send(self._answer_loss(job))
        elif isinstance(job, AdapterJob):
            job.reply.send(self._adapter(job))
        elif isinstance(job, TrainJob):
            self._start_training(job)
        else:
            raise TypeError(f"unknown job {type(job).__name__}")
        return None

    # Generation --------------------------------------------------------------------------------

    def _start_generation(self, job: GenerateJob) -> tuple[Row, Pairs] | None:
        model = self.model
        assert model is not None
        request = job.request
        self._check_servable(request.adapter)
        past = None
        if job.imported_kv is not None:
            pairs, cached_ids = check_import(job.imported_kv, job.imported_metadata or {}, model.identity)
            continuation = model.token_ids_of(job.continuation or [], "continuation", special=False)
            prompt_ids = cached_ids + continuation
            past = [(k.to(model.device), v.to(model.device)) for k, v in pairs]
            if continuation:
                new_ids = continuation
            else:
                # The last prompt token must go through the model again to yield the first logits.
                past = [(k[:, :, :-1], v[:, :, :-1]) for k, v in past] if len(cached_ids) > 1 else None
                new_ids = cached_ids[-1:]
        else:
            prompt_ids = model.prompt_ids(request)
            new_ids = prompt_ids
        model.check_context(len(prompt_ids), request.params.max_new_tokens)
        progress = RowProgress(
            len(prompt_ids),
            request.params,
            model.eos_token_ids,
            model.decode,
            request.adapter,
            submitted_at=job.submitted_at,
            admitted_at=time.monotonic(),
        )
        logits, cache = model.forward_prompt(new_ids, past, request.adapter)
        generator = new_generator(request.params, model.device)
        token = pick_tokens(logits[-1:], [request.params], [generator])[0]
        row = Row(job, progress, generator, token, request.adapter)
        if self._deliver(row, token):
            return None
        return row, cache

    def _join(self, joining: list[tuple[Row, Pairs]]) -> None:
        assert self._batch is not None
        # The cache holds the prompt; the first sampled token is fed by the next decode step.
        lengths = [cache[0][0].shape[-2] for _, cache in joining]
        addition = self.layout.add([(row, length) for (row, _), length in zip(joining, lengths, strict=True)])
        self._batch.add(addition, [cache for _, cache in joining], lengths)
        self.rows.extend(row for row, _ in joining)

    def _decode_step(self) -> None:
        model, batch = self.model, self._batch
        assert model is not None and batch is not None
        if self._fault is not None:
            (message, out_of_memory), self._fault = self._fault, None
            raise torch.OutOfMemoryError(message) if out_of_memory else InjectedFault(message)
        started = time.perf_counter()
        rows = self.rows
        input_ids = torch.tensor([[row.next_token] for row in rows], device=model.device)
        positions = torch.tensor([[length] for length in self.layout.lengths], device=model.device)
        padded = any(self.layout.pads())
        cache, mask = batch.step_inputs(padded)
        output = model.runnable(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            **cache_kwargs(model.model, cache),
            use_cache=True,
            **model.adapters.forward_kwargs([row.weights for row in rows]),
        )
        batch.after_step(output_cache(output))
        self.layout.advance()
        tokens = pick_tokens(output.logits[:, -1], [r.progress.params for r in rows], [r.generator for r in rows])
        self._last_decode_s = time.perf_counter() - started
        self.stats.record_step(len(rows), self._last_decode_s)
        leaving = []
        for row, token in zip(rows, tokens, strict=True):
            if row.job.reply.cancelled or self._deliver(row, token):
                leaving.append(row)
            else:
                row.next_token = token
        if leaving:
            removal = self.layout.remove(leaving)
            batch.remove(removal)
            self.rows = [rows[i] for i in removal.keep]
            if model.adapters.retired:
                model.adapters.drop_retired({row.weights for row in self.rows})

    def _deliver(self, row: Row, token: int) -> bool:
        """Pass one token to the caller; True when the row is finished (and its result sent)."""
        delta = row.progress.accept(token)
        if delta.text or delta.token_ids:
            row.job.reply.send(delta)
        if row.progress.finished:
            result = row.progress.result()
            self.stats.record_request(result.total_time_s)
            row.job.reply.send(result)
            return True
        return False

    # One-shot model work -----------------------------------------------------------------------

    def _prefill(self, job: PrefillJob) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        model = self.model
        assert model is not None
        self._check_servable(job.adapter)
        if job.messages is not None:
            token_ids = model.chat_ids(job.messages)
        else:
            token_ids = model.token_ids_of(job.prompt or [], "prompt", special=True)
        model.check_context(len(token_ids), 0)
        past, rest = None, token_ids
        if job.prefix_kv is not None:
            pairs, cached_ids = check_import(job.prefix_kv, job.prefix_metadata or {}, model.identity)
            if (job.prefix_metadata or {}).get("adapter") != job.adapter:
                raise IncompatibleCache("the prefix cache was computed with another adapter")
            if len(cached_ids) > len(token_ids) or token_ids[: len(cached_ids)] != cached_ids:
                raise IncompatibleCache("the imported cache does not cover a prefix of the prompt")
            past = [(k.to(model.device), v.to(model.device)) for k, v in pairs]
            rest = token_ids[len(cached_ids) :]
            if not rest:
                return export_cache(past, token_ids, model.identity, job.adapter)
        _, cache = model.forward_prompt(rest, past, job.adapter)
        return export_cache(cache, token_ids, model.identity, job.adapter)

    def _score(self, job: ScoreJob) -> ScoreResult:
        model = self.model
        assert model is not None
        self._check_servable(job.adapter)
        prompt = model.token_ids_of(job.prompt, "prompt", special=True)
        completion = model.token_ids_of(job.completion, "completion", special=False)
        if not prompt or not completion:
            raise InvalidRequest("score needs a non-empty prompt and completion")
        model.check_context(len(prompt) + len(completion), 0)
        # Logits at positions len(prompt)-1 .. end-1 predict the completion tokens.
        logits, _ = model.forward_prompt(prompt + completion, None, job.adapter, logits_to_keep=len(completion) + 1)
        logprobs = torch.log_softmax(logits[:-1].float(), dim=-1)
        target = torch.tensor(completion, device=logprobs.device)
        chosen = logprobs.gather(1, target.unsqueeze(1)).squeeze(1)
        best_logprobs, best_ids = logprobs.max(dim=-1)
        return ScoreResult(
            token_ids=tuple(completion),
            logprobs=tuple(chosen.tolist()),
            argmax_token_ids=tuple(best_ids.tolist()),
            argmax_logprobs=tuple(best_logprobs.tolist()),
            prompt_tokens=len(prompt),
        )

    def _answer_loss(self, job: AnswerLossJob) -> list[float]:
        model = self.model
        assert model is not None
        self._check_servable(job.adapter)
        eos = self._training_eos()
        encoded = [
            (*encode_example(model.chat_ids(e.prompt_messages), model.text_ids(e.answer, special=False), eos,
                             job.max_tokens), 1.0)
            for e in job.examples
        ]
        pad = model.tokenizer.pad_token_id
        ids, mask, labels, _ = collate(encoded, pad if pad is not None else 0, model.device)
        with torch.no_grad():
            output = model.runnable(
                input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=answer_positions(labels),
                **model.adapters.forward_kwargs([job.adapter] * len(encoded)),
            )
        return row_losses(output.logits, labels).tolist()

    def _training_eos(self) -> int | None:
        """The end-of-turn token that training appends to every answer."""
        model = self.model
        assert model is not None
        eos = model.tokenizer.eos_token_id
        return eos if eos in model.eos_token_ids else min(model.eos_token_ids, default=None)

    def _check_servable(self, adapter: str | None) -> None:
        assert self.model is not None
        self.model.adapters.check(adapter)
        if self.training is not None and adapter == self.training.spec.shadow_id:
            # Its weights change between decode steps: a request would see several versions of it.
            raise AdapterBusy(f"adapter {adapter!r} is being trained; ask again when training has ended")

    def _adapter(self, job: AdapterJob) -> list[str]:
        model = self.model
        assert model is not None
        if self.rows:
            # peft changes modules in place; rows already decoding keep the adapters they started with.
            busy = {row.progress.adapter for row in self.rows}
            if job.action == "unload" and job.adapter_id in busy:
                raise AdapterBusy(f"adapter {job.adapter_id!r} is in use by running requests")
        training = self.training.spec.shadow_id if self.training is not None else None
        if training is not None and training in (job.adapter_id, job.source) and job.action != "save":
            raise AdapterBusy(f"adapter {training!r} is being trained")
        adapters = model.adapters
        if job.action == "load":
            adapters.load(job.adapter_id, Path(job.folder or ""))
        elif job.action == "unload":
            adapters.unload(job.adapter_id)
        elif job.action == "create":
            adapters.create(job.adapter_id, rank=job.rank, seed=job.seed)
        elif job.action == "ensure":
            if job.adapter_id not in adapters.folders:
                adapters.create(job.adapter_id, rank=job.rank, seed=job.seed)
        elif job.action == "promote":
            self._promote(job.source or "", job.adapter_id)
        elif job.action == "save":
            adapters.save(job.adapter_id, Path(job.folder or ""))
        model.adapter_ids = tuple(model.adapters.ids())
        return list(model.adapter_ids)

    def _promote(self, source: str, target: str) -> None:
        """Between decode steps, so atomic for every request: requests admitted from now on get the new
        weights; requests already decoding with the target finish on the weights they started with."""
        adapters = self.model.adapters  # type: ignore[union-attr]
        adapters.check(source)
        if source == target:
            raise InvalidRequest("promote needs two different adapters")
        if not adapters.is_finite(source):
            raise AdapterError(f"adapter {source!r} has non-finite weights; it cannot replace {target!r}")
        if target not in adapters.folders:
            adapters.create(target, like=source)
        elif not adapters.same_shape(source, target):
            raise AdapterError(f"adapters {source!r} and {target!r} have different shapes (rank or targets)")
        started = [row for row in self.rows if row.weights == target]
        started += [row for row, _ in self._joining if row.weights == target]
        if started:
            hidden = adapters.retire(target)
            for row in started:
                row.weights = hidden
        adapters.copy_weights(source, target)
        adapters.folders[target] = None  # the saved copy, if any, is out of date

    # Shadow training --------------------------------------------------------------------------

    def _start_training(self, job: TrainJob) -> None:
        model = self.model
        assert model is not None
        spec = job.spec
        if self.training is not None:
            raise AdapterBusy(f"adapter {self.training.spec.shadow_id!r} is being trained; one training at a time")
        adapters = model.adapters
        if any(row.progress.adapter == spec.shadow_id for row in self.rows):
            raise AdapterBusy(f"adapter {spec.shadow_id!r} is in use by running requests")
        eos = self._training_eos()
        encoded = []
        for example in spec.examples:
            prompt = model.chat_ids(example.prompt_messages)
            answer = model.text_ids(example.answer, special=False)
            ids, labels = encode_example(prompt, answer, eos, spec.max_tokens)
            encoded.append((ids, labels, float(example.weight)))
        live = spec.live_id if spec.live_id in adapters.folders else None
        if spec.shadow_id in adapters.folders and live is not None and not adapters.same_shape(live, spec.shadow_id):
            adapters.unload(spec.shadow_id)  # a shadow is a scratch copy: remade in the live adapter's shape
        if spec.shadow_id not in adapters.folders:
            if live is not None:
                adapters.create(spec.shadow_id, like=live)
            else:
                adapters.create(spec.shadow_id, rank=spec.rank, seed=spec.seed)
        if live is not None:
            adapters.copy_weights(live, spec.shadow_id)
        adapters.folders[spec.shadow_id] = None
        model.adapter_ids = tuple(adapters.ids())
        trained = adapters.parameters_of(spec.shadow_id)
        trained_ids = {id(p) for p in trained.values()}
        for parameter in adapters.model.parameters():
            parameter.requires_grad_(id(parameter) in trained_ids)
        params = list(trained.values())
        optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
        policy = TrainingPolicy(spec.latency_target_s, spec.min_share)
        self.training = TrainingRun(spec, encoded, policy, optimizer, params, random.Random(spec.seed))
        self._train_job = job

    def _training_step(self) -> None:
        """As much of one optimizer step as the policy allows in this round; the step's last piece applies it."""
        run, job, model = self.training, self._train_job, self.model
        assert run is not None and job is not None and model is not None
        if job.reply.cancelled:
            self._end_training("cancelled")
            return
        count = run.policy.examples_this_round(
            len(self.queue), len(self.rows), self._last_decode_s, run.example_s, run.remaining_in_step
        )
        if count == 0 and run.policy.owed_a_piece(run.example_s, run.since_trained_s(time.perf_counter())):
            count = 1  # load that never leaves room must not starve training: its floor share, one example
            run.floor_pieces += 1
        if count == 0:
            run.yielded_rounds += 1
            return
        started = time.perf_counter()
        piece, step_weight = run.take_piece(count)
        try:
            if self._train_fault is not None:
                message, self._train_fault = self._train_fault, None
                raise InjectedFault(message)
            loss = self._train_piece(run, piece, step_weight)
            if not run.piece_done(loss, len(piece), time.perf_counter() - started):
                return  # the step's other examples run in later rounds
            torch.nn.utils.clip_grad_norm_(run.params, 1.0)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
            run.step_done()
        except Exception as exc:  # only the shadow's tensors take gradients: serving goes on untouched
            job.reply.send(AdapterError(f"training {run.spec.shadow_id!r} failed: {type(exc).__name__}: {exc}"))
            self._end_training("failed")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return
        job.reply.send((len(run.losses), run.losses[-1]))
        if run.done:
            job.reply.send(run.report())
            self._end_training("done")

    def _train_piece(self, run: TrainingRun, piece: list, step_weight: float) -> float:
        """Forward and backward for some examples of a step; gradients add up in the shadow's tensors."""
        model = self.model
        assert model is not None
        # peft moves requires_grad to its "active" adapter when that one is unloaded; only the shadow trains.
        for parameter in run.params:
            parameter.requires_grad_(True)
        pad = model.tokenizer.pad_token_id
        # The model stays in eval mode: peft refuses per-row adapter names in training mode, and the adapters
        # made here have no dropout, so the step computes the same function that serving does.
        with torch.enable_grad():
            ids, mask, labels, weights = collate(piece, pad if pad is not None else 0, model.device)
            output = model.runnable(
                input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=answer_positions(labels),
                **model.adapters.forward_kwargs([run.spec.shadow_id] * len(piece)),
            )
            loss = weighted_loss(output.logits, labels, weights, step_weight)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the training loss is {loss.item()}")
            loss.backward()
        return float(loss.detach())

    def _end_training(self, outcome: str) -> None:
        run = self.training
        if run is not None:
            for parameter in run.params:
                parameter.requires_grad_(False)
                parameter.grad = None
            self.last_training = {**run.status(), "outcome": outcome}
        self.training, self._train_job = None, None

    # Failure handling --------------------------------------------------------------------------

    def _recover(self, exc: Exception) -> None:
        kind = "out of memory" if isinstance(exc, torch.OutOfMemoryError) else "model failure"
        # Callers that hear of the crash must not see "ready" before the recovery has run.
        self._set_state("loading", f"recovering from: {exc}")
        self._fail_in_flight(EngineCrashed(f"{kind} while running the batch: {type(exc).__name__}: {exc}"))
        now = time.monotonic()
        self._crashes.append(now)
        while self._crashes and now - self._crashes[0] > CRASH_WINDOW_S:
            self._crashes.popleft()
        if len(self._crashes) > self.config.max_recoveries:
            self._go_down(f"{len(self._crashes)} crashes within {CRASH_WINDOW_S:.0f}s, last: {exc}")
            return
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if isinstance(exc, torch.OutOfMemoryError):
            self._set_state("ready")
            return  # the weights are intact; the freed batch was the problem
        # Anything else may have left modules half-updated: load the weights again, then the adapters.
        old = self.model
        try:
            kept = _in_memory_adapters(old) if old is not None else {}
            self.model = load_model_state(self.config, reuse_identity=old.identity if old else None)
            if old is not None:
                for adapter_id, folder in old.adapters.folders.items():
                    if folder is not None:
                        try:
                            self.model.adapters.load(adapter_id, folder)
                        except AdapterError as adapter_exc:  # its folder changed meanwhile: take it from memory
                            self._restore_from(old, adapter_id, adapter_exc)
                    elif adapter_id in kept:
                        self.model.adapters.restore(adapter_id, *kept[adapter_id])
                self.model.adapter_ids = tuple(self.model.adapters.ids())
            self._batch = BatchCache(self.model.model.config)
            self._set_state("ready")
        except Exception as reload_exc:
            self._go_down(f"reload after a crash failed: {type(reload_exc).__name__}: {reload_exc}")

    def _restore_from(self, old: ModelState, adapter_id: str, reason: Exception) -> None:
        assert self.model is not None
        try:
            if not old.adapters.is_finite(adapter_id):
                raise ValueError("its weights are no longer finite")
            self.model.adapters.restore(adapter_id, *old.adapters.snapshot(adapter_id))
            log.warning('event=adapter_restored_from_memory adapter=%s reason="%s"', adapter_id, reason)
        except Exception as exc:  # noqa: BLE001 - that adapter is lost; the model and the others serve on
            log.warning('event=adapter_dropped adapter=%s reason="%s; %s"', adapter_id, reason, exc)

    def _fail_in_flight(self, error: EngineError) -> None:
        failing = [row.job for row in self.rows] + [row.job for row, _ in self._joining] + self._taken
        if self._train_job is not None:
            failing.append(self._train_job)
            self._end_training("failed")
        self.rows, self._taken, self._joining = [], [], []
        if self.model is not None and self.model.adapters.retired:
            self.model.adapters.drop_retired(set())
        self.stats.requests_failed += len(failing)  # counted before the callers hear of it
        for job in failing:
            job.reply.send(error)
        self.layout = BatchLayout(self.config.max_batch)
        if self._batch is not None:
            self._batch.clear()

    def _set_state(self, state: str, reason: str | None = None) -> None:
        self.state, self.reason = state, reason
        self.on_state_change()

    def _go_down(self, reason: str) -> None:
        self._set_state("down", reason)
        self._fail_in_flight(EngineDown(reason))

    def _refuse_queued(self) -> bool:
        """While down, answer every queued job with the reason; False once the queue is closed."""
        for job in self.queue.take(self.queue.capacity, timeout_s=None):
            job.reply.send(EngineDown(self.reason or "the engine is down"))
        return not self.queue.closed


def _in_memory_adapters(old: ModelState) -> dict[str, tuple[Any, dict[str, torch.Tensor]]]:
    """Adapters made or changed here and not saved since (created, trained, promoted over): a crash in the
    batch does not write to LoRA tensors, so their weights are copied over to the reloaded model, unless
    they are no longer finite."""
    kept = {}
    for adapter_id, folder in old.adapters.folders.items():
        if folder is None:
            try:
                if old.adapters.is_finite(adapter_id):
                    kept[adapter_id] = old.adapters.snapshot(adapter_id)
            except Exception:  # noqa: BLE001 - an adapter that cannot be read is dropped, the rest are kept
                continue
    return kept

"""Phase-less scheduler (vLLM v1 style): a token budget per step, no prefill/decode phases.

Each step running requests are served first (a decode is one token, a request partway through
its prompt continues its chunk), then waiting requests are admitted with what is left of the
budget (chunked prefill; prefix-cache hits count as computed). When pages run out the newest (or,
under the priority policy, least important) running request is preempted by recompute. No JAX.
"""

from __future__ import annotations

import bisect
import itertools
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from engine.config import SchedulerConfig
from engine.page_allocator import PageAllocator
from engine.types import (
    Request,
    RequestStatus,
    RequestUpdate,
    ScheduledRequest,
    SchedulerOutput,
    StepOutput,
    TokenLogprobs,
)


class QueueFullError(RuntimeError):
    """`max_waiting_requests` wait beyond the free running slots already (the API answers 503)."""


@dataclass(frozen=True)
class SchedulerStats:
    """Counts for metrics, taken at one moment."""

    num_running: int
    num_waiting: int
    num_preemptions: int  # since start
    num_cached_tokens: int  # prefix-cache hit tokens since start
    num_aborted: int  # sequences aborted since start (a client gone, a sibling failed)
    page_usage: float


@dataclass
class _StepPlan:
    """Scratch state while building one step: tokens per request in batch order, budget left."""

    budget: int
    num_tokens: dict[str, int] = field(default_factory=dict)
    preempted_ids: list[str] = field(default_factory=list)


class Scheduler:
    """Decides each step which requests compute which tokens; applies the runner's results."""

    def __init__(
        self,
        scheduler_config: SchedulerConfig,
        allocator: PageAllocator,
        token_buckets: tuple[int, ...] = (),
    ) -> None:
        """token_buckets: the step sizes the runner compiled (ascending). Given, a step that
        would spill just past one is trimmed to fit it (see `_fit_bucket`)."""
        self.config = scheduler_config
        self.allocator = allocator
        self.token_buckets = tuple(sorted(token_buckets))
        chunked = scheduler_config.enable_chunked_prefill
        cap = scheduler_config.long_prefill_token_threshold
        self._cap = cap if chunked and cap > 0 else scheduler_config.max_num_batched_tokens
        self.requests: dict[str, Request] = {}  # unfinished ones
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._finished_ids: set[str] = set()  # since the last schedule()
        self.num_preemptions = 0
        self.num_cached_tokens = 0
        self.num_aborted = 0

    def add_request(self, request: Request) -> None:
        """Queue a new request. Raises ValueError if it can never run, QueueFullError if full."""
        cfg = self.config
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use.")
        if not request.prompt_token_ids:
            raise ValueError("the prompt must contain at least one token.")
        if request.num_prompt_tokens > cfg.max_model_len:
            raise ValueError(
                f"the prompt has {request.num_prompt_tokens} tokens, more than the maximum "
                f"context length of {cfg.max_model_len}."
            )
        max_total = self.max_total_tokens(request)
        max_len = max_total - 1  # the last sampled token is never computed: it needs no slot
        if -(-max_len // self.allocator.page_size) > self.allocator.num_usable_pages:
            raise ValueError(f"a request of {max_len} tokens does not fit in the KV cache.")
        # Requests the next step will admit into free running slots are not really waiting: a
        # burst that arrives between two steps must not be turned away while slots are free.
        free_slots = max(cfg.max_num_seqs - len(self.running), 0)
        limit = cfg.max_waiting_requests
        if limit is not None and len(self.waiting) >= limit + free_slots:
            raise QueueFullError(f"the waiting queue is full ({limit}).")
        request.status = RequestStatus.WAITING
        request.max_total_tokens = max_total
        self.requests[request.request_id] = request
        self._enqueue(request)

    def max_total_tokens(self, request: Request) -> int:
        """Prompt plus the most output tokens the request may get."""
        max_tokens = request.sampling_params.max_tokens
        if max_tokens is None:
            return self.config.max_model_len
        return min(request.num_prompt_tokens + max_tokens, self.config.max_model_len)

    def abort_request(self, request_ids: str | Iterable[str]) -> None:
        """Finish these requests with reason "abort"; unknown or finished ids are ignored."""
        self.finish_requests(request_ids, "abort")

    def finish_requests(
        self, request_ids: str | Iterable[str], reason: str, stop_reason: int | str | None = None
    ) -> None:
        """Finish requests from outside (a stop string seen by the detokenizer, a disconnect).

        reason: "stop", "length" or "abort". Their pages are released and the next
        `SchedulerOutput` lists them in `finished_request_ids`.
        """
        status = RequestStatus.from_finish_reason(reason)
        for request_id in [request_ids] if isinstance(request_ids, str) else request_ids:
            request = self.requests.get(request_id)
            if request is None:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            request.stop_reason = stop_reason
            self.num_aborted += status == RequestStatus.FINISHED_ABORTED
            self._finish(request, status)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            num_preemptions=self.num_preemptions,
            num_cached_tokens=self.num_cached_tokens,
            num_aborted=self.num_aborted,
            page_usage=self.allocator.usage,
        )

    def check_invariants(self) -> None:
        """Allocator invariants against the requests that hold pages (tests, debugging)."""
        assert all(not r.page_ids for r in self.waiting), "a waiting request holds pages"
        assert len(self.running) <= self.config.max_num_seqs, "too many running requests"
        self.allocator.check_invariants(self.running)

    def schedule(self) -> SchedulerOutput:
        """Pick this step's work: running requests first, then admit waiting ones."""
        plan = _StepPlan(budget=self.config.max_num_batched_tokens)
        self._schedule_running(plan)
        # After a preemption pages are short: admitting more would only preempt again.
        if not plan.preempted_ids:
            self._schedule_waiting(plan)
        self._fit_bucket(plan)
        requests = tuple(
            self._scheduled_request(self.requests[rid], n) for rid, n in plan.num_tokens.items()
        )
        finished, self._finished_ids = self._finished_ids, set()
        return SchedulerOutput(
            requests=requests,
            num_batched_tokens=self.config.max_num_batched_tokens - plan.budget,
            finished_request_ids=frozenset(finished),
            preempted_request_ids=frozenset(plan.preempted_ids),
        )

    def _schedule_running(self, plan: _StepPlan) -> None:
        # Runs for every running request each step (a thousand at vLLM's H100 defaults): kept
        # to plain attribute reads, with the request's token count built inline.
        running, cap, num_tokens = RequestStatus.RUNNING, self._cap, plan.num_tokens
        for request in list(self.running):
            if plan.budget == 0:
                break
            if request.status is not running:
                continue  # preempted earlier in this loop
            num_pending = (
                len(request.prompt_token_ids) + len(request.output_token_ids) + request.num_inflight
            )
            if request.num_inflight and num_pending >= request.max_total_tokens:
                continue  # the token in flight is its last: it finishes when that comes back
            num_new = min(num_pending - request.num_computed_tokens, plan.budget, cap)
            if num_new <= 0:
                continue
            while not self.allocator.allocate_slots(request, num_new):
                victim = max(self.running, key=self._preemption_key)
                self._preempt(victim, plan)
                if victim is request:
                    break
            else:
                num_tokens[request.request_id] = num_new
                plan.budget -= num_new

    def _future_pages(self, request: Request, num_held_tokens: int) -> int:
        """Pages the request will need beyond those covering `num_held_tokens`, for the rest of
        its prompt and its next `admission_horizon` tokens (at most its max_tokens; its last
        sampled token is never computed, so it needs no slot)."""
        size, horizon = self.allocator.page_size, self.config.admission_horizon
        want = min(
            request.max_total_tokens - 1, request.num_tokens + request.num_inflight + horizon
        )
        return max(-(-want // size) - -(-num_held_tokens // size), 0)

    def _schedule_waiting(self, plan: _StepPlan) -> None:
        cfg = self.config
        reserve = 0
        if cfg.admission_horizon and self.waiting:  # computed once a step, then kept up to date
            size = self.allocator.page_size
            reserve = sum(self._future_pages(r, len(r.page_ids) * size) for r in self.running)
        limit = self._running_limit(reserve)
        while self.waiting and plan.budget > 0 and len(self.running) < limit:
            request = self.waiting[0]
            page_ids, num_hit = [], 0
            # Cached prefixes have no prompt logprobs to report, so such requests compute all.
            if request.sampling_params.prompt_logprobs is None:
                page_ids, num_hit = self.allocator.get_computed_pages(request)
            num_new = request.num_tokens - num_hit
            if not cfg.enable_chunked_prefill and num_new > plan.budget:
                break
            num_new = min(num_new, plan.budget, self._cap)
            own = self._future_pages(request, num_hit + num_new) if cfg.admission_horizon else 0
            # With nothing running, admit anyway: the request fits the cache (add_request).
            keep_free = reserve + own if self.running else 0
            if not self.allocator.allocate_slots(request, num_new, page_ids, reserve=keep_free):
                break
            reserve += own
            self.waiting.popleft()
            if request.status == RequestStatus.WAITING:
                request.num_cached_tokens = num_hit
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = num_hit
            self.num_cached_tokens += num_hit
            self.running.append(request)
            plan.num_tokens[request.request_id] = num_new
            plan.budget -= num_new

    def _running_limit(self, reserve: int) -> int:
        """max_num_seqs, or the first token bucket B at or above the running count where the
        KV cache would stop admission between B and 3/4 of the next bucket (see
        `SchedulerConfig.compute_bound_tokens`). The estimate: the pages free beyond `reserve`
        hold that many more requests like the head of the queue (its prompt and horizon), up
        to the number waiting."""
        cfg, buckets, n = self.config, self.token_buckets, len(self.running)
        if not (cfg.compute_bound_tokens and cfg.admission_horizon and buckets and self.waiting):
            return cfg.max_num_seqs
        per_request = max(1, self._future_pages(self.waiting[0], 0))
        room = max(self.allocator.num_free_pages - reserve, 0) // per_request
        predicted = n + min(room, len(self.waiting))
        i = bisect.bisect_left(buckets, n)  # the first bucket >= n
        for bound, nxt in itertools.pairwise(buckets[i:]):
            if bound >= min(predicted, cfg.max_num_seqs):
                break
            # Padding up to a bucket below compute_bound_tokens costs no matmul time.
            if nxt >= cfg.compute_bound_tokens and predicted < 3 * nxt // 4:
                return bound
        return cfg.max_num_seqs

    def _fit_bucket(self, plan: _StepPlan) -> None:
        """Trim prefill chunks so that the step fills a token bucket rather than spilling just
        past one. A step runs padded to the next bucket: 10 decodes and a 1,024-token prompt
        would run as 2,048 tokens (twice the time); trimmed to 1,024, the prompt's last 10
        tokens ride with the next step's decodes. Trimmed only when the padding saved exceeds
        the tokens deferred, when the deferred tokens grow the next step's bucket by less
        than the trim saves here, and when the bucket the step would run in is at least
        `compute_bound_tokens`: below it, padded rows cost no matmul time, and a trim would
        only delay the prompt's first token by a step. Nor when the bucket is at most an
        eighth larger than the one below (a fine ladder of the user's, say 1,088 above 1,024,
        or a ladder's top rung, the step limit, just above a power of two: a 1,024-token
        prompt beside its decodes then takes one step, not two): the padding saved is small
        beside the step the prompt's first token would wait. Pages stay allocated for the
        deferred tokens."""
        buckets, total = self.token_buckets, self.config.max_num_batched_tokens - plan.budget
        if not self.config.enable_chunked_prefill:
            return
        i = bisect.bisect_left(buckets, total)
        if i == 0 or i == len(buckets) or buckets[i] == total:
            return
        if buckets[i] < self.config.compute_bound_tokens:
            return
        if (buckets[i] - buckets[i - 1]) * 8 <= buckets[i - 1]:
            return
        excess = total - buckets[i - 1]
        trimmable = sum(n - 1 for n in plan.num_tokens.values())
        if excess >= buckets[i] - total or excess > trimmable:
            return
        # The deferred tokens run in the next step, beside what cannot be trimmed (decodes, and
        # a token of each prompt chunk): trim only if that step's bucket grows by less than
        # this one shrinks. Otherwise the same cut comes back every step, and a prompt's tail
        # trickles in a token a step (63 decodes with buckets of 64 and 2,048 tokens held a
        # 640-token prompt for 588 steps).
        kept = total - trimmable
        if self._bucket(kept + excess) - self._bucket(kept) >= buckets[i] - buckets[i - 1]:
            return
        for request_id in reversed(plan.num_tokens):  # the latest admitted give way first
            cut = min(excess, plan.num_tokens[request_id] - 1)
            plan.num_tokens[request_id] -= cut
            plan.budget += cut
            excess -= cut
            if excess == 0:
                break

    def _bucket(self, num_tokens: int) -> int:
        """The token bucket a step of `num_tokens` (at most the largest) runs in: `pick_bucket`,
        which the scheduler cannot import without JAX."""
        return self.token_buckets[bisect.bisect_left(self.token_buckets, num_tokens)]

    def _preemption_key(self, request: Request) -> tuple[int, float]:
        """Larger = preempted first: newest (fcfs), or largest priority value, then newest."""
        if self.config.policy == "priority":
            return request.priority, request.arrival_time
        return 0, request.arrival_time

    def _preempt(self, request: Request, plan: _StepPlan) -> None:
        """Free the request's pages and queue it for recompute (outputs kept as tokens to redo)."""
        self.running.remove(request)
        self.allocator.free(request)
        request.num_computed_tokens = 0
        request.num_inflight = 0  # those tokens are dropped when they come back, then redone
        request.status = RequestStatus.PREEMPTED
        plan.budget += plan.num_tokens.pop(request.request_id, 0)
        plan.preempted_ids.append(request.request_id)
        self.num_preemptions += 1
        self._enqueue(request, front=True)

    def _enqueue(self, request: Request, front: bool = False) -> None:
        """fcfs: arrival order, preempted ones at the front. priority: by (priority, arrival)."""
        if self.config.policy == "priority":
            key = lambda r: (r.priority, r.arrival_time)
            insort = bisect.insort_left if front else bisect.insort_right
            insort(self.waiting, request, key=key)
        elif front:
            self.waiting.appendleft(request)
        else:
            self.waiting.append(request)

    def _scheduled_request(self, request: Request, num_new: int) -> ScheduledRequest:
        """The request's work in this step. Advances it now, not when the results come back,
        so the next step can be scheduled while this one runs (its sampled tokens are read on
        the device; see ScheduledRequest)."""
        start = request.num_computed_tokens
        end = start + num_new
        prompt = request.prompt_token_ids
        num_prompt, num_known = len(prompt), len(prompt) + len(request.output_token_ids)
        if start >= num_known:  # a decode whose input token is still on the device
            token_ids = (-1,) * num_new
        else:  # -1: a token sampled by a step still on the device, read there by the runner
            known = request.token_ids_slice(start, end)
            token_ids = (*known, *[-1] * (num_new - len(known)))
        sample = end == num_known + request.num_inflight
        request.num_computed_tokens = end
        request.num_inflight += sample
        return ScheduledRequest(
            request.request_id,
            token_ids,
            start,
            tuple(request.page_ids),
            sample,
            num_prompt,
            request.sampling_params,
            prompt[end] if end < num_prompt else -1,
        )

    def update(
        self, scheduler_output: SchedulerOutput, step_output: StepOutput
    ) -> list[RequestUpdate]:
        """Apply a step's results: cache full pages, append sampled tokens and check stop
        conditions. Requests finished or preempted since scheduling are skipped.

        Returns one update per request that got a token, prompt logprobs, or finished.
        """
        updates = []
        logprobs, sampled = step_output.logprobs, step_output.sampled_token_ids
        requests, running = self.requests, RequestStatus.RUNNING
        cache_full_pages = self.allocator.cache_full_pages
        any_finished = False
        for i, scheduled in enumerate(scheduler_output.requests):
            request = requests.get(scheduled.request_id)
            if request is None or request.status is not running:
                continue
            cache_full_pages(request)
            prompt_lps = (
                self._new_prompt_logprobs(request, scheduled, step_output)
                if step_output.prompt_logprobs
                else ()
            )
            if not scheduled.sample:
                if prompt_lps:
                    updates.append(
                        RequestUpdate(request.request_id, (), new_prompt_logprobs=prompt_lps)
                    )
                continue
            token_id = int(sampled[i])
            request.num_inflight -= 1
            request.output_token_ids.append(token_id)
            status = self._check_stop(request)
            entry = logprobs[i] if logprobs is not None else None
            new_logprobs = (entry,) if entry is not None else ()
            if status is None:
                updates.append(
                    RequestUpdate(
                        request.request_id, (token_id,), False, None, None, new_logprobs, prompt_lps
                    )
                )
                continue
            any_finished = True
            self._finish(request, status)
            updates.append(
                RequestUpdate(
                    request.request_id,
                    (token_id,),
                    True,
                    status.finish_reason,
                    request.stop_reason,
                    new_logprobs,
                    prompt_lps,
                )
            )
        if any_finished:  # one pass over the running list, not one `remove` per request
            self.running = [r for r in self.running if r.status is running]
        return updates

    def _new_prompt_logprobs(
        self, request: Request, scheduled: ScheduledRequest, step_output: StepOutput
    ) -> tuple[TokenLogprobs, ...]:
        """This chunk's prompt logprobs not reported before (recompute repeats positions)."""
        entries = step_output.prompt_logprobs.get(request.request_id)
        if not entries:
            return ()
        skip = max(request.num_prompt_logprobs_sent - scheduled.start_position, 0)
        new = tuple(entries[skip:])
        request.num_prompt_logprobs_sent += len(new)
        return new

    def _check_stop(self, request: Request) -> RequestStatus | None:
        """Stop conditions after a token was appended (stop strings are the detokenizer's)."""
        params, outputs = request.sampling_params, request.output_token_ids
        if len(request.prompt_token_ids) + len(outputs) >= request.max_total_tokens:
            return RequestStatus.FINISHED_LENGTH_CAPPED
        if len(outputs) < params.min_tokens:
            return None
        token_id = outputs[-1]
        if not params.ignore_eos and token_id == request.eos_token_id:
            return RequestStatus.FINISHED_STOPPED
        if token_id in params.stop_token_ids:
            request.stop_reason = token_id
            return RequestStatus.FINISHED_STOPPED
        return None

    def _finish(self, request: Request, status: RequestStatus) -> None:
        """Mark finished, release pages, forget it; the runner hears of it next step."""
        request.status = status
        self.allocator.free(request)
        del self.requests[request.request_id]
        self._finished_ids.add(request.request_id)

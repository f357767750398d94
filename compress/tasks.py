"""Choice tasks (RTE, Stanford politeness) scored through lm-eval, and the same prompts as training examples.

The task definitions are lm-eval task YAMLs in the repository's eval/tasks/ (shipped in the wheel as
compress/lm_tasks). lm-eval renders the prompts, builds few-shot contexts and computes accuracy; compress supplies the
rows (named datasets: the local data directory, else the hub), scores the answers with `AnswerScorer`, and derives
what lm-eval does not give: per-sample correctness (for the paired test between steps), the majority-class
baseline, and per-label precision, recall and F1.

A task-adapted model is trained on the same rendered prompts (`prompted_examples`, loss on the answer tokens only),
so training and scoring see exactly the same text and the same tokenization."""

from __future__ import annotations

import copy
import logging
import time
from contextlib import contextmanager
from functools import lru_cache
from importlib import resources
from pathlib import Path

import torch
import yaml
from rich.progress import Progress

from compress import distributed
from compress.config.data import DATASETS
from compress.config.evals import ChoiceEval
from compress.data import load_records, source_of
from compress.errors import CompressError
from compress.stats import accuracy


def _task_dir() -> Path:
    try:
        return Path(str(resources.files("compress.lm_tasks")))
    except ModuleNotFoundError:  # a source checkout used without installing it (PYTHONPATH)
        return Path(__file__).resolve().parent.parent / "eval" / "tasks"


def choice_tasks() -> tuple[str, ...]:
    return tuple(sorted(path.stem for path in _task_dir().glob("*.yaml")))


@lru_cache(maxsize=None)
def task_definition(name: str) -> dict:
    """The task YAML as a dict (with compress's own `compress:` section)."""
    path = _task_dir() / f"{name}.yaml"
    if not path.is_file():
        raise CompressError(f"unknown choice task '{name}'; known: {', '.join(choice_tasks())}")
    return yaml.safe_load(path.read_text())


def task_for_split(dataset: str) -> tuple[str, str] | None:
    """(task, split) when `dataset` is a split of a choice task (e.g. politeness-train), else None."""
    for task in choice_tasks():
        for split, name in task_definition(task)["compress"]["splits"].items():
            if name == dataset:
                return task, split
    return None


def datasets_of_eval(config) -> list[str]:
    """The datasets a recipe's `eval:` section reads: the perplexity text and every split of each choice task."""
    names = set()
    for task in config.tasks:
        if task == "wikitext2":
            names.add(config.wikitext2.dataset)
        else:
            names |= set(task_definition(task)["compress"]["splits"].values())
    return sorted(names)


def datasets_of_recipe(recipe) -> list[str]:
    """Every named dataset a (loaded) recipe reads: calibration sets, training data, eval tasks."""
    names = set(datasets_of_eval(recipe.eval))
    for step in recipe.resolved().steps:
        names |= set(step.spec.datasets_read(step.config))
    return sorted(name for name in names if name in DATASETS)


@contextmanager
def _lm_eval_session():
    """Run lm-eval quietly (its notices about our custom dataset builder are not the user's concern; its errors
    still show) and with each prompt template compiled once: lm-eval compiles the Jinja template anew for every row
    (the 4,780 politeness-train prompts took 10.4 s to render and tokenize on the CPU; 1.6 s with the compilation
    reused and the tokenizer called in batches). The templates and their rendering are lm-eval's own."""
    import lm_eval.evaluator
    import lm_eval.utils

    logger = logging.getLogger("lm_eval")
    level, compile_template = logger.level, lm_eval.utils.env.from_string
    env_info, git_hash = lm_eval.evaluator.add_env_info, lm_eval.evaluator.get_git_commit_hash
    logger.setLevel(logging.ERROR)
    lm_eval.utils.env.from_string = lru_cache(maxsize=64)(compile_template)
    # the environment report lm-eval adds to its results (`pip list`, `git describe` and a dozen more subprocesses
    # for every task at every step) is not read here: compress's report records the machine
    lm_eval.evaluator.add_env_info = lambda storage: None
    lm_eval.evaluator.get_git_commit_hash = lambda: None
    try:
        yield
    finally:
        logger.setLevel(level)
        lm_eval.utils.env.from_string = compile_template
        lm_eval.evaluator.add_env_info, lm_eval.evaluator.get_git_commit_hash = env_info, git_hash


def _lm_eval_config(name: str, data_dir: str | None, fewshot: bool = True) -> dict:
    """The lm-eval task config: the YAML without compress's section, with a dataset builder that reads our rows.
    fewshot=False (zero-shot scoring): the train split is neither read nor handed to lm-eval, which otherwise loads
    it and walks every row of it (4,780 for politeness) into its few-shot sampler at every evaluation."""
    import datasets

    definition = copy.deepcopy(task_definition(name))  # lm-eval may fill in the config; the cached one stays as read
    splits = definition.pop("compress")["splits"]
    if not fewshot:
        splits = {split: dataset for split, dataset in splits.items() if split != "train"}
        definition.pop("training_split", None)

    def build(**_):  # lm-eval passes the task metadata as keyword arguments
        return {split: datasets.Dataset.from_list(load_records(dataset, data_dir)) for split, dataset in splits.items()}

    return {**definition, "custom_dataset": build}


@lru_cache(maxsize=1)
def _task_manager():
    """A task manager without lm-eval's built-in task index: our tasks come as configs, and indexing the ~26,000
    built-in task files took 11.7 s of every 12.5 s politeness eval of the tiny test model."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=False)


MAX_PADDING = 0.02  # the padding a batch of answers may carry, as a fraction of the tokens it runs
MIN_BATCH_TOKENS = 256  # below this a batch takes the next input whatever its padding


def _length_batches(ordered: list, batch_size: int, max_padding: float = MAX_PADDING,
                    min_tokens: int = MIN_BATCH_TOKENS) -> list[list]:
    """Inputs sorted longest first, cut into batches of at most `batch_size`; a batch of `min_tokens` or more closes
    before an input that would make its padding more than `max_padding` of its tokens: every padding token runs
    through the whole model. `min_tokens`: below that many rows a CPU matrix product runs slower, so no batch is cut
    smaller (measured in eval/bench_evals.py)."""
    batches: list[list] = []
    for seq in ordered:
        batch = batches[-1] if batches else None
        if batch and len(batch) < batch_size:
            width, rows = len(batch[0]), len(batch) + 1
            if (width * len(batch) < min_tokens
                    or width * rows - sum(map(len, batch)) - len(seq) <= max_padding * width * rows):
                batch.append(seq)
                continue
        batches.append([seq])
    return batches


def _scorer_class():
    from lm_eval.models.huggingface import HFLM

    class AnswerScorer(HFLM):
        """lm-eval's HFLM with its log-likelihood loop replaced; everything else (tokenization, few-shot contexts,
        padding-token handling) is HFLM's. Ours is needed because of a benchmark (eval/bench_evals.py): HFLM computes
        the output head and a log-softmax over the whole vocabulary at every position of every padded sequence; here
        the model runs once per distinct input (the answers of one question that differ only in their last token
        share it), its head only at the answer positions of the batch (`logits_to_keep`), the log-softmax only at
        each answer's own. The model's own forward, so its head's post-processing (Gemma 2/3's final logit
        soft-capping, any family's logit scale) is in every score."""

        show_progress = True

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
            # request i scores its answer from the logits of input (context + answer)[:-1]; a causal model's logits
            # on a prefix do not depend on what follows, so an input that is a prefix of another input of the same
            # question (" polite" vs " imp|olite", or " True" vs " False") is served by that longer input's pass
            spans: dict[int, tuple[int, int]] = {}  # request -> [first, end): the input positions predicting its answer
            for index, (_, context, continuation) in enumerate(requests):
                end = min(len(context) + len(continuation), self.max_length + 1) - 1
                spans[index] = (end - len(continuation), end)
            by_context: dict[tuple[int, ...], list[int]] = {}
            for index, (_, context, _) in enumerate(requests):
                by_context.setdefault(tuple(context), []).append(index)
            inputs: dict[tuple[int, ...], list[int]] = {}  # input run through the decoder -> requests it serves
            for indices in by_context.values():
                kept: list[tuple[int, ...]] = []
                for index in sorted(indices, key=lambda i: -len(requests[i][2])):
                    _, context, continuation = requests[index]
                    seq = tuple((context + continuation)[-(self.max_length + 1):][:-1])
                    longer = next((k for k in kept if k[: len(seq)] == seq), None)
                    if longer is None:
                        kept.append(longer := seq)
                    inputs.setdefault(longer, []).append(index)
            results: dict[int, tuple[float, bool]] = {}
            ordered = sorted(inputs, key=len, reverse=True)  # similar lengths together: little padding
            # several processes: each scores its share of the batches, then all of them gather every answer
            batches = distributed.share(_length_batches(ordered, override_bs or self.batch_size))
            with torch.inference_mode(), Progress(transient=True, disable=not self.show_progress) as progress:
                bar = progress.add_task("scoring answers", total=sum(len(inputs[seq]) for b in batches for seq in b))
                for batch in batches:
                    width = len(batch[0])
                    ids = torch.full((len(batch), width), self.tokenizer.pad_token_id or 0, dtype=torch.long)
                    for row, seq in enumerate(batch):
                        ids[row, : len(seq)] = torch.tensor(seq)
                    # the positions any answer of the batch is scored at (sorted, so each answer's span is a run of
                    # consecutive columns of the logits)
                    kept = sorted({p for seq in batch for index in inputs[seq] for p in range(*spans[index])})
                    column = {position: c for c, position in enumerate(kept)}
                    # right padding under a causal mask: pads follow every real token and cannot change them
                    logits = self.model(input_ids=ids.to(self.device), use_cache=False,
                                        logits_to_keep=torch.tensor(kept, device=self.device)).logits
                    for row, seq in enumerate(batch):
                        for index in inputs[seq]:
                            _, _, continuation = requests[index]
                            first, end = spans[index]
                            start = column[first]
                            logprobs = torch.log_softmax(logits[row, start : start + end - first].float(), dim=-1)
                            target = torch.tensor(continuation, device=logprobs.device)
                            answer = (logprobs.gather(1, target[:, None]).sum().item(),
                                      bool((logprobs.argmax(-1) == target).all()))
                            results[index] = answer
                            self.cache_hook.add_partial("loglikelihood", requests[index][0], answer)
                        progress.advance(bar, len(inputs[seq]))
            for share in distributed.gather(results) if distributed.active() else ():
                results.update(share)
            return [results[index] for index in range(len(requests))]

    return AnswerScorer


def _per_label(golds: list[int], predictions: list[int], labels: list[str]) -> dict:
    from sklearn.metrics import precision_recall_fscore_support

    precision, recall, f1, support = precision_recall_fscore_support(
        golds, predictions, labels=list(range(len(labels))), zero_division=0)
    return {label: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                    "support": int(support[i])} for i, label in enumerate(labels)}


def score_choice_tasks(model, tokenizer, tasks, config: ChoiceEval = ChoiceEval(), data_dir=None,
                       show_progress: bool = True, seed: int = 0) -> dict:
    """Score `tasks` (names in eval/tasks) on the in-memory model; returns {task: result} with accuracy, its standard
    error, the majority-class baseline, per-label P/R/F1 and the per-sample correctness string ('1' = right)."""
    for name in tasks:
        task_definition(name)  # unknown names fail before any work
    pad_token = tokenizer.pad_token  # HFLM gives a tokenizer without one its unk or eos token: undone afterwards
    try:
        with _lm_eval_session():  # HFLM warns that an in-memory model bypasses its loading options: that is the point
            scorer = _scorer_class()(pretrained=model, tokenizer=tokenizer, batch_size=config.batch_size)
        scorer.show_progress = show_progress
        return {name: _score(scorer, name, config, data_dir, seed) for name in tasks}
    finally:
        tokenizer.pad_token = pad_token


def _score(scorer, name: str, config: ChoiceEval, data_dir, seed: int) -> dict:
    from lm_eval import simple_evaluate

    start = time.perf_counter()
    with _lm_eval_session():
        output = simple_evaluate(scorer, tasks=[_lm_eval_config(name, data_dir, fewshot=config.num_fewshot > 0)],
                                 task_manager=_task_manager(),
                                 num_fewshot=config.num_fewshot, limit=config.limit, log_samples=True,
                                 bootstrap_iters=0, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                 fewshot_random_seed=seed)
    # under torchrun lm-eval returns its results on the process of LOCAL_RANK 0 only (every process scored its share
    # of the answers in _loglikelihood_tokens and has every score): that process's reading is handed to the others
    return distributed.broadcast(_result(name, output, config, data_dir, start) if distributed.is_main() else None)


def _result(name: str, output: dict, config: ChoiceEval, data_dir, start: float) -> dict:
    samples = sorted(output["samples"][name], key=lambda s: s["doc_id"])
    golds = [int(s["target"]) for s in samples]
    predictions = [max(range(len(s["filtered_resps"])), key=lambda i: s["filtered_resps"][i][0]) for s in samples]
    correct = [g == p for g, p in zip(golds, predictions)]
    labels = task_definition(name)["compress"]["labels"]
    return {
        **accuracy(correct),
        "majority_baseline": max(golds.count(i) for i in range(len(labels))) / len(golds),
        "per_label": _per_label(golds, predictions, labels),
        "correct": "".join("1" if c else "0" for c in correct),
        "protocol": _protocol(name, config, data_dir),
        "seconds": round(time.perf_counter() - start, 2),
    }


def _protocol(name: str, config: ChoiceEval, data_dir) -> dict:
    definition = task_definition(name)
    splits = definition["compress"]["splits"]
    scored = splits.get("test") or splits["validation"]
    return {"dataset": scored, "source": source_of(scored, data_dir), "prompt": definition["doc_to_text"],
            "choices": definition["doc_to_choice"],
            "labels": definition["compress"]["labels"], "num_fewshot": config.num_fewshot,
            "fewshot_from": splits["train"] if config.num_fewshot else None, "limit": config.limit,
            "scoring": "the answer with the higher summed log-likelihood (lm-eval acc)"}


def prompted_examples(tokenizer, dataset: str, seq_len: int, data_dir=None) -> list[dict]:
    """The rows of a choice task's split (e.g. politeness-train) as training examples: the task's prompt followed by
    the right answer, with labels only on the answer tokens (-100 elsewhere). lm-eval's own task object renders the
    prompt and the answer, and the tokenization is lm-eval's (the context's trailing spaces move to the answer;
    context and answer are encoded together, then split), so the model learns exactly the sequence it is scored on.
    Prompts longer than `seq_len` lose their first tokens."""
    from lm_eval.api.task import ConfigurableTask

    name, split = task_for_split(dataset)
    with _lm_eval_session():
        task = ConfigurableTask(config=_lm_eval_config(name, str(data_dir) if data_dir else None))
        pairs = []
        for doc in task.dataset[split]:
            context = task.doc_to_text(doc)
            answer = task.config.target_delimiter + task.doc_to_choice(doc)[task.doc_to_target(doc)]
            spaces = len(context) - len(context.rstrip())
            if spaces:
                context, answer = context[:-spaces], context[-spaces:] + answer
            pairs.append((context, answer))
    contexts = tokenizer([context for context, _ in pairs]).input_ids
    wholes = tokenizer([context + answer for context, answer in pairs]).input_ids
    examples = []
    for context, whole in zip(contexts, wholes):
        n_answer = len(whole) - len(context)
        ids = torch.tensor(whole[-seq_len:])
        labels = torch.full_like(ids, -100)
        labels[-n_answer:] = ids[-n_answer:]
        examples.append({"input_ids": ids, "labels": labels})
    return examples

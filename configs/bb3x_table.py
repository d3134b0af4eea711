"""The BB3 -> BB3x experiment on CPU: ``python -m bb3x_jax.experiments.bb3x_table``.

The main config (configs/cringe.py) with a model that can learn the synthetic
world in minutes on two cores, and extra sections read only by the
experiment: ``baseline`` (how the stand-in for BB3 is trained: likelihood on all
bot responses), ``control`` (the baseline trained on with likelihood for as many
steps as the iterations take, so the table shows what CRINGE adds beyond more
training), ``sampled`` (every model also graded on sampled responses) and
``experiment`` (the seeds, and what labels the iterations' generations); the
``iterate`` section of the main config sets the CRINGE iterations.
"""

from ml_collections import config_dict

from configs import cringe


def get_config() -> config_dict.ConfigDict:
    config = cringe.get_config()
    config.model.preset = "small"  # d=128, 2+2 layers: learns topics in minutes on CPU
    config.data.text_truncate = 64  # the last turns carry the topic and the question
    config.data.context_buckets = (32, 64)
    config.train.objective = "cringe"  # the iterations' objective
    config.train.eval_every = 0
    config.train.warmup_steps = 30
    config.checkpoint.every_steps = 500
    config.checkpoint.best_metric = ""  # every model is its run's last checkpoint
    config.eval.split = "test"  # the table: every test-split context (the valid split validates)
    config.eval.checkpoint = "latest"
    config.eval.generate_examples = 100_000
    # The ground truth grades (eval.judge); what labels the iterations' generations is
    # experiment.label_judge (the experiment sets iterate.judge from it).
    config.eval.judge = "synthetic"
    # The sampling recipe: each iteration's CRINGE (and the same-data controls) anchored to the
    # iteration it starts from by KL(model || start), the bad token left out (cringe.anchor_kl).
    # Without it sampled nonsense roughly triples; weight 2 or 3 keeps sampling near the baseline
    # but slows the beam's climb (docs/experiments.md, the sampling recipe).
    config.train.kl_anchor = 1.0
    config.train.kl_anchor_direction = "reverse"
    config.iterate.iterations = 3
    config.iterate.contexts = 2000
    config.iterate.steps = 300
    # The feedback classifier (--mode=train_judge) starts from the baseline, the workdir's own
    # model (train it first): its decoder has learnt from every bot message what follows a
    # context, which the ~1,900 feedback labels alone cannot teach (valid split against the
    # world's rule: balanced accuracy 79% for the small encoder from random weights, 87% from
    # the baseline, in about 2 minutes on 2 cores).
    config.judge.init_from = "workdir"
    config.judge.steps = 150
    config.judge.learning_rate = 3e-4
    config.baseline = config_dict.ConfigDict({"objective": "mle", "steps": 4000})
    # same_data: comma-separated objectives each trained like the CRINGE iterations on the same
    # generated splits and steps, as further rows ('' -> none): rejection sampling (likelihood on the
    # judged-good generations only) and unlikelihood, so the table separates CRINGE from its data
    config.control = config_dict.ConfigDict({"enabled": True, "same_data": "mle_positive_only,unlikelihood"})
    config.sampled = config_dict.ConfigDict({"enabled": True, "temperature": 1.0})
    # seeds: each runs the whole experiment on its own world (data.synthetic.seed) and training
    # (seed) in <workdir>/seed_<s>; the table reports mean ± sd. label_judge: classifier (the
    # feedback classifier trained on the release's feedback, as the paper did) or synthetic (the
    # ground truth labels too: an upper bound).
    # workers: the stages of all seeds run on this many processes at once, each pinned to its share
    # of the CPUs (bb3x_jax/experiments/jobs.py); 0 runs them one after another in this process. The
    # CPUs per process set XLA's summation order, so they are part of what makes the numbers.
    config.experiment = config_dict.ConfigDict({"seeds": (0, 1, 2), "label_judge": "classifier", "workers": 2})
    return config

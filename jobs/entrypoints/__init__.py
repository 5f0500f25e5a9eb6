"""Ray Job entry points: ``python -m jobs.entrypoints.<name> ARGS`` runs ``gen1 <name> ARGS`` as a Ray Job driver.

A Ray Job's driver gets ``RAY_ADDRESS`` from the job supervisor, so the pipelines' ``ray.init()`` joins the
cluster the job was submitted to. Job specs (``jobs/specs/*.yaml``) name these modules as their entry
points; `jobs.entrypoints.submit` submits a spec, and so do ``ray job submit`` and KubeRay's RayJob.

A job spec is a YAML mapping::

    name: eval-davis-nightly              # submission ids are <name>-<UTC time>
    description: ...
    entrypoint: python -m jobs.entrypoints.eval --config jobs/specs/eval-davis-nightly.yaml
    entrypoint_num_cpus: 1                # optional, as `ray job submit`
    entrypoint_num_gpus: 0
    runtime_env: {working_dir: ., env_vars: {...}}
    metadata: {...}
    config: {...}                          # optional: the command's config (e.g. pipelines.evaluate.EvalConfig)
"""

SPEC_KEYS = frozenset(
    {"name", "description", "entrypoint", "entrypoint_num_cpus", "entrypoint_num_gpus", "entrypoint_memory",
     "entrypoint_resources", "runtime_env", "metadata", "config"}
)

"""The FineTuneJob contract, shared by the runner and the controller. Imports only pydantic and pyyaml.

    names    the API's group/version/kind/plural, the runner pod's environment, the termination-log path
    spec     the spec's typed models: what to train and where the result goes (the source of the CRD schema
             and the docs)
    cluster  the fields only a cluster acts on: Secrets, volumes, model cache, resources, scheduling, retries
    parse    a job file or mapping -> Job, every problem named with its field and fix
    status   phases, reasons, condition types and the status shape; who writes which field
    errors   exit codes, the permanent/retryable error classes, secret redaction
    uris     where files live: hf://, s3://, gs://, local paths; the table of schemes and what each may hold
    places   every place a job names, parsed once when it is loaded (Job.places)
    cost     what a job costs before any GPU is held: FLOPs per token, the measured-throughput table
             (throughput.json), the estimate a spec alone allows (the controller's status.estimate)
"""

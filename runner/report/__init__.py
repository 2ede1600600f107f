"""What a run tells: events on stdout, the console on a terminal, the status patched into the FineTuneJob,
experiment trackers, and the report published beside the weights.

    events       the JSON event stream, phases and the termination message (Reporter)
    console      the human view on a terminal; summary, its final screen
    kube_status  the runner's own status patches under the controller
    tracking     TensorBoard and the trackers of training.reportTo
    artifacts    the published report: metrics, plots, the job, the model card (card, plots, metrics_file)

Imports: runner.api, runner.data, runner.parallel.
"""

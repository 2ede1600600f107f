"""The policies that decide a FineTuneJob's status and the controller's next actions, one module per concern.

Every policy is a pure function of one pass's observations (`observed.Observed`) and returns a typed result
(`results.Verdict` or `results.Decision`), or None when it has nothing to say. controller/status.py only orders
them and combines their results, in three stages:

  1. the verdict: the first policy that decides the job Succeeded or Failed wins
       bounds ........ a spec or status outside the controller's bounds (controller/limits.py)
       outcome ....... an attempt succeeded, or failed in a way another attempt cannot help
       deadline ...... spec.activeDeadlineSeconds has passed
       backoff ....... more failures were counted than spec.backoffLimit allows
       admission ..... the cluster's policy, a missing JobSet install or the contract refuses the spec
  2. the phase, when no verdict was given: the first policy that applies
       finished ...... a decided job deletes what still runs; a job recorded as finished stays finished
       suspend ....... spec.suspend stops the active attempt
       active ........ an active attempt is Pending (why) or Running (which stage)
       next_attempt .. the next attempt waits for stopped pods and the backoff, then is created
  3. what follows from the new status, every one that applies
       deadline ...... look again when the deadline passes
       finished ...... a finished job's runner identity is revoked
       ttl ........... spec.ttlSecondsAfterFinished deletes the finished attempts' Jobs

spec_change warns when the live spec changed after the job started (it runs with the spec of its first attempt:
Observed.effective). These modules import observed, results, the rest of controller/ and the contract; never
controller/status.py.
"""

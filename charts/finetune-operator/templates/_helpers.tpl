{{/* The chart name (nameOverride). */}}
{{- define "finetune.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The prefix of every resource name: <release>-<chart>, or the release name if it contains the chart name. */}}
{{- define "finetune.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "finetune.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "finetune.selectorLabels" -}}
app.kubernetes.io/name: {{ include "finetune.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "finetune.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "finetune.selectorLabels" . }}
app.kubernetes.io/component: controller
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "finetune.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "finetune.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name: name an existing ServiceAccount when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "finetune.controllerImage" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "finetune.runnerImage" -}}
{{- printf "%s:%s" .Values.runner.image.repository (default .Chart.AppVersion .Values.runner.image.tag) -}}
{{- end -}}

{{/*
The controller's permissions on FineTuneJobs and their children: the rules of `python -m controller rbac`
(controller/rbac.py) less the two cluster-scoped ones (CRDs, Namespaces). Granted by a ClusterRole when all
namespaces are watched, by one Role per namespace otherwise. tests/deploy checks they match controller/rbac.py.
*/}}
{{- define "finetune.jobRules" -}}
- apiGroups: [finetune.dev]
  resources: [finetunejobs]
  verbs: [get, list, watch]
# the runner's Role grants get/patch on finetunejobs/status: the controller must hold them to grant them
- apiGroups: [finetune.dev]
  resources: [finetunejobs/status]
  verbs: [get, patch, update]
# ownerReferences with blockOwnerDeletion on the children (OwnerReferencesPermissionEnforcement)
- apiGroups: [finetune.dev]
  resources: [finetunejobs/finalizers]
  verbs: [update]
- apiGroups: [batch]
  resources: [jobs]
  verbs: [get, list, watch, create, delete]
{{- if .Values.jobset.enabled }}
# jobs on several nodes: one JobSet per attempt (JobSet itself is installed separately)
- apiGroups: [jobset.x-k8s.io]
  resources: [jobsets]
  verbs: [get, list, watch, create, delete]
{{- end }}
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch]
# the runner's per-job identity: a ServiceAccount, a Role and a RoleBinding
- apiGroups: [""]
  resources: [serviceaccounts]
  verbs: [create, delete]
- apiGroups: [rbac.authorization.k8s.io]
  resources: [roles]
  verbs: [create, delete]
- apiGroups: [rbac.authorization.k8s.io]
  resources: [rolebindings]
  verbs: [get, list, watch, create, delete]
- apiGroups: ["", events.k8s.io]
  resources: [events]
  verbs: [create, patch]
{{- end -}}

{{/* Read-only cluster-scoped discovery: kopf lists and watches CRDs and Namespaces to know what to watch. */}}
{{- define "finetune.discoveryRules" -}}
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  verbs: [get, list, watch]
- apiGroups: [""]
  resources: [namespaces]
  verbs: [get, list, watch]
{{- end -}}

{{/* Names and labels. */}}
{{- define "r1.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "r1.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "r1.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "r1.serviceAccountName" -}}
{{- default (include "r1.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{- define "r1.claimName" -}}
{{- default (printf "%s-data" (include "r1.fullname" .)) .Values.persistence.existingClaim -}}
{{- end -}}

{{- define "r1.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/*
One pod template: the head or a pool's worker.
  dict "root" $ "container" "ray-head"|"ray-worker" "group" <values of head / a pool> "gpus" <int>
*/}}
{{- define "r1.podTemplate" -}}
{{- $v := .root.Values -}}
{{- $pool := ne .name "head" -}}{{/* the network settings are the pools' (NCCL between their pods) */}}
metadata:
  labels:
    {{- include "r1.labels" .root | nindent 4 }}
    r1.io/group: {{ .name }}
  {{- if and $pool $v.network.annotations }}
  annotations:
    {{- toYaml $v.network.annotations | nindent 4 }}
  {{- end }}
spec:
  serviceAccountName: {{ include "r1.serviceAccountName" .root }}
  automountServiceAccountToken: false
  {{- with $v.image.pullSecrets }}
  imagePullSecrets:
    {{- range . }}
    - name: {{ . }}
    {{- end }}
  {{- end }}
  securityContext:
    runAsNonRoot: true
    runAsUser: {{ $v.securityContext.runAsUser }}
    runAsGroup: {{ $v.securityContext.runAsGroup }}
    fsGroup: {{ $v.securityContext.fsGroup }}
    seccompProfile:
      {{- if or (eq .name "head") (eq .name "rollout") }}
      {{- toYaml $v.codeSandbox.seccompProfile | nindent 6 }}
      {{- else }}
      type: RuntimeDefault
      {{- end }}
  {{- with .group.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if or .group.tolerations (gt (int .gpus) 0) }}
  tolerations:
    {{- with .group.tolerations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
    {{- if gt (int .gpus) 0 }}
    - key: nvidia.com/gpu
      operator: Exists
      effect: NoSchedule
    {{- end }}
  {{- end }}
  {{- with .group.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ .container }}
      image: {{ include "r1.image" .root }}
      imagePullPolicy: {{ $v.image.pullPolicy }}
      securityContext:
        allowPrivilegeEscalation: false
        privileged: false
        readOnlyRootFilesystem: {{ $v.securityContext.readOnlyRootFilesystem }}
        capabilities:
          drop: ["ALL"]
          {{- $caps := list }}
          {{- if and $pool $v.network.rdmaResources }}{{ $caps = append $caps "IPC_LOCK" }}{{ end }}
          {{- if $v.stackDumps }}{{ $caps = append $caps "SYS_PTRACE" }}{{ end }}
          {{- with $caps }}
          add: {{ toJson . }}
          {{- end }}
      env:
        - name: HOME
          value: /tmp/home
        - name: RAY_USAGE_STATS_ENABLED
          value: "0"
        - name: R1_POOL_GROUP
          value: {{ .name }}
        {{- if $pool }}
        {{- range $name, $value := $v.network.ncclEnv }}
        - name: {{ $name }}
          value: {{ $value | quote }}
        {{- end }}
        {{- end }}
        - name: NODE_NAME  # the Kubernetes node: what r1's health monitor calls this node in incidents and W&B
          valueFrom:
            fieldRef:
              fieldPath: spec.nodeName
        {{- $pod := .name }}
        {{- range $v.secretEnv }}
        {{- if has $pod (default (list "head") .pods) }}
        - name: {{ .name }}
          valueFrom:
            secretKeyRef:
              name: {{ .secretName }}
              key: {{ .key }}
        {{- end }}
        {{- end }}
      resources:
        requests:
          cpu: {{ .group.cpu | quote }}
          memory: {{ .group.memory | quote }}
          {{- if gt (int .gpus) 0 }}
          nvidia.com/gpu: {{ .gpus }}
          {{- end }}
          {{- if $pool }}
          {{- range $name, $count := $v.network.rdmaResources }}
          {{ $name }}: {{ $count }}
          {{- end }}
          {{- end }}
        limits:
          cpu: {{ .group.cpu | quote }}
          memory: {{ .group.memory | quote }}
          {{- if gt (int .gpus) 0 }}
          nvidia.com/gpu: {{ .gpus }}
          {{- end }}
          {{- if $pool }}
          {{- range $name, $count := $v.network.rdmaResources }}
          {{ $name }}: {{ $count }}
          {{- end }}
          {{- end }}
      volumeMounts:
        - name: r1-config
          mountPath: /etc/r1
          readOnly: true
        - name: r1-data
          mountPath: {{ $v.persistence.mountPath }}
        - name: dshm
          mountPath: /dev/shm
        - name: tmp
          mountPath: /tmp
  volumes:
    - name: r1-config
      configMap:
        name: {{ include "r1.fullname" .root }}-config
    - name: r1-data
      {{- if $v.persistence.enabled }}
      persistentVolumeClaim:
        claimName: {{ include "r1.claimName" .root }}
      {{- else }}
      emptyDir: {}
      {{- end }}
    - name: dshm
      emptyDir:
        medium: Memory
        sizeLimit: {{ $v.shmSize }}
    - name: tmp
      emptyDir: {}
{{- end -}}

{{/* The Ray cluster: the head (the driver, no pool tag) and one worker group per pool, tagged with its pool. */}}
{{- define "r1.rayClusterSpec" -}}
{{- $v := .Values -}}
rayVersion: {{ $v.rayVersion | quote }}
# Ray token auth (KubeRay 1.5.1+): the operator keeps a random token in a Secret of its own and sets RAY_AUTH_MODE and
# RAY_AUTH_TOKEN on every Ray container; GCS, raylet and dashboard (Jobs API) requests without it are refused.
authOptions:
  mode: token
headGroupSpec:
  rayStartParams:
    dashboard-host: "0.0.0.0"
    num-gpus: "0"
  template:
    {{- include "r1.podTemplate" (dict "root" . "container" "ray-head" "name" "head" "group" $v.head "gpus" 0) | nindent 4 }}
workerGroupSpecs:
  {{- range $pool := list "train" "rollout" }}
  {{- $group := index $v.pools $pool }}
  - groupName: {{ $pool }}
    replicas: {{ $group.replicas }}
    minReplicas: {{ $group.replicas }}
    maxReplicas: {{ $group.replicas }}
    rayStartParams:
      resources: {{ printf "\"{\\\"r1_pool_%s\\\": 1000}\"" $pool | squote }}
    template:
      {{- include "r1.podTemplate" (dict "root" $ "container" "ray-worker" "name" $pool "group" $group "gpus" $group.gpus) | nindent 6 }}
  {{- end }}
{{- end -}}

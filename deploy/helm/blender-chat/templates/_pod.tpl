{{/* The bot's pod, shared by the Deployment and the StatefulSet. */}}
{{- define "blender-chat.podTemplate" -}}
{{- $grace := add (int .Values.shutdownGraceSeconds) (int .Values.preStopSeconds) 10 -}}
metadata:
  labels:
    {{- include "blender-chat.selectorLabels" . | nindent 4 }}
    {{- with .Values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    # A changed setting restarts the pods.
    checksum/config: {{ include (print $.Template.BasePath "/configmap.yaml") . | sha256sum }}
    {{- with .Values.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  # The bot talks to no Kubernetes API.
  automountServiceAccountToken: false
  enableServiceLinks: false
  # Above SHUTDOWN_GRACE + the preStop pause, so replies in flight finish before SIGKILL.
  terminationGracePeriodSeconds: {{ $grace }}
  securityContext:
    # The image's user (Dockerfile: useradd --uid 10001).
    runAsNonRoot: true
    runAsUser: 10001
    runAsGroup: 10001
    fsGroup: 10001
    fsGroupChangePolicy: OnRootMismatch
    seccompProfile:
      type: RuntimeDefault
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  initContainers:
    - name: {{ ternary "download-model" "copy-model" (eq .Values.model.source "download") }}
      image: {{ include "blender-chat.image" . }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      {{- if eq .Values.model.source "download" }}
      # Fetch the model into the volume and convert it for CTranslate2; quick when already there.
      command: ["blender-chat", "download"]
      envFrom:
        - configMapRef:
            name: {{ include "blender-chat.fullname" . }}
      {{- else }}
      # The image's /data holds the baked model; the volume mounted over /data would hide it, so it
      # is copied in. -u: only what is missing or newer in the image (a later image's model), so a
      # restart on the same volume copies nothing.
      command: ["cp", "-a", "-u", "/data/.", "/seed/"]
      {{- end }}
      securityContext:
        {{- include "blender-chat.containerSecurity" . | nindent 8 }}
      resources:
        {{- toYaml .Values.initResources | nindent 8 }}
      volumeMounts:
        - name: data
          mountPath: {{ ternary "/data" "/seed" (eq .Values.model.source "download") }}
        - name: tmp
          mountPath: /tmp
  containers:
    - name: bot
      image: {{ include "blender-chat.image" . }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      args: ["blender-chat", "run"]
      ports:
        - name: http
          containerPort: 8080
          protocol: TCP
      envFrom:
        - configMapRef:
            name: {{ include "blender-chat.fullname" . }}
      env:
        {{- include "blender-chat.secretEnv" . | nindent 8 }}
      # /readyz answers 503 until the model is loaded and every platform is connected.
      startupProbe:
        httpGet: {path: /readyz, port: http}
        periodSeconds: {{ .Values.probes.startup.periodSeconds }}
        failureThreshold: {{ .Values.probes.startup.failureThreshold }}
        timeoutSeconds: {{ .Values.probes.startup.timeoutSeconds }}
      # /healthz fails once a platform has stopped for good (a reset token): restart.
      livenessProbe:
        httpGet: {path: /healthz, port: http}
        periodSeconds: {{ .Values.probes.liveness.periodSeconds }}
        failureThreshold: {{ .Values.probes.liveness.failureThreshold }}
        timeoutSeconds: {{ .Values.probes.liveness.timeoutSeconds }}
      # Not ready while a platform reconnects or the pod is stopping; Redis down is only "degraded".
      readinessProbe:
        httpGet: {path: /readyz, port: http}
        periodSeconds: {{ .Values.probes.readiness.periodSeconds }}
        failureThreshold: {{ .Values.probes.readiness.failureThreshold }}
        timeoutSeconds: {{ .Values.probes.readiness.timeoutSeconds }}
      lifecycle:
        # Keep serving while the endpoint removal reaches the Service and the Ingress; SIGTERM after.
        preStop:
          exec:
            command: ["sleep", "{{ .Values.preStopSeconds }}"]
      securityContext:
        {{- include "blender-chat.containerSecurity" . | nindent 8 }}
      resources:
        {{- toYaml .Values.resources | nindent 8 }}
      volumeMounts:
        - name: data
          mountPath: /data
        - name: tmp
          mountPath: /tmp
  volumes:
    {{- if not (include "blender-chat.onRedis" .) }}
    - name: data
      persistentVolumeClaim:
        claimName: {{ .Values.persistence.existingClaim | default (include "blender-chat.fullname" .) }}
    {{- else }}
    - name: data
      emptyDir:
        sizeLimit: {{ .Values.scratch.sizeLimit }}
    {{- end }}
    - name: tmp
      emptyDir:
        sizeLimit: 1Gi
  {{- with .Values.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}

{{- define "blender-chat.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{- define "blender-chat.containerSecurity" -}}
runAsNonRoot: true
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
{{- end -}}

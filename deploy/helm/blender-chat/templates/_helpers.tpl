{{/* Names, labels, the shape, and the refusals. */}}

{{- define "blender-chat.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "blender-chat.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "blender-chat.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "blender-chat.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "blender-chat.selectorLabels" -}}
app.kubernetes.io/name: {{ include "blender-chat.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: bot
{{- end -}}

{{- define "blender-chat.redisSelectorLabels" -}}
app.kubernetes.io/name: {{ include "blender-chat.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: redis
{{- end -}}

{{- define "blender-chat.secretName" -}}
{{- .Values.secrets.existingSecret | default (include "blender-chat.fullname" .) -}}
{{- end -}}

{{/* "true" when conversations live in Redis (an existing one or the chart's), else "". */}}
{{- define "blender-chat.onRedis" -}}
{{- if or .Values.redis.url .Values.redis.urlSecret.name .Values.redis.inChart.enabled -}}true{{- end -}}
{{- end -}}

{{/* "true" when pods are a StatefulSet: Discord on several pods, each serving its own shards. */}}
{{- define "blender-chat.sharded" -}}
{{- if and .Values.discord.enabled (gt (int .Values.replicas) 1) -}}true{{- end -}}
{{- end -}}

{{- define "blender-chat.redisHost" -}}
{{- printf "%s-redis" (include "blender-chat.fullname" .) -}}
{{- end -}}

{{/* The replica count the cluster will keep at least: the autoscaler's floor when it is on. */}}
{{- define "blender-chat.minReplicas" -}}
{{- if .Values.autoscaling.enabled -}}{{ .Values.autoscaling.minReplicas }}{{- else -}}{{ .Values.replicas }}{{- end -}}
{{- end -}}

{{/*
The combinations that lose data or cannot work, refused before anything is created.
Included by every template that depends on the shape, so `helm template -s` refuses too.
*/}}
{{- define "blender-chat.refusals" -}}
{{- $redis := include "blender-chat.onRedis" . -}}
{{- $most := .Values.replicas -}}
{{- if .Values.autoscaling.enabled -}}{{- $most = max (int .Values.replicas) (int .Values.autoscaling.maxReplicas) -}}{{- end -}}
{{- if and .Values.redis.inChart.enabled (or .Values.redis.url .Values.redis.urlSecret.name) -}}
{{- fail "blender-chat: redis.inChart.enabled and redis.url/redis.urlSecret both name a Redis: choose one" -}}
{{- end -}}
{{- if and .Values.redis.url .Values.redis.urlSecret.name -}}
{{- fail "blender-chat: redis.url and redis.urlSecret.name both name a Redis: choose one" -}}
{{- end -}}
{{- if and .Values.discord.enabled (gt (int $most) 1) (not $redis) -}}
{{- fail (printf "blender-chat: Discord shards on %d pods need Redis (set redis.url or redis.inChart.enabled=true): without it every pod keeps its own conversations on its own volume, and no pod can answer the messages a stopped one left unanswered" (int $most)) -}}
{{- end -}}
{{- if and (gt (int $most) 1) (not $redis) -}}
{{- fail (printf "blender-chat: %d replicas on SQLite would lose data: SQLite is one file on one pod's volume, so set replicas=1, or put conversations in Redis (redis.url or redis.inChart.enabled=true)" (int $most)) -}}
{{- end -}}
{{- if and .Values.autoscaling.enabled .Values.discord.enabled -}}
{{- fail "blender-chat: autoscaling with Discord on: DISCORD_SHARD_COUNT is replicas x discord.shardsPerPod, fixed at install, so an autoscaler would start pods for shards that do not exist. Scale Discord by changing replicas with helm upgrade" -}}
{{- end -}}
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) -}}
{{- fail "blender-chat: autoscaling.minReplicas is above autoscaling.maxReplicas" -}}
{{- end -}}
{{- if and (eq .Values.slack.mode "http") (not .Values.ingress.enabled) (not .Values.slack.publicUrl) -}}
{{- fail "blender-chat: slack.mode=http needs a way in for Slack's events: set ingress.enabled=true with ingress.host, or slack.publicUrl to the URL your own load balancer serves /slack/events at (or use slack.mode=socket, which needs none)" -}}
{{- end -}}
{{- if not .Values.secrets.existingSecret -}}
{{- $needed := dict -}}
{{- if .Values.discord.enabled -}}{{- $_ := set $needed "discordToken" .Values.secrets.discordToken -}}{{- end -}}
{{- if ne .Values.slack.mode "off" -}}{{- $_ := set $needed "slackBotToken" .Values.secrets.slackBotToken -}}{{- end -}}
{{- if eq .Values.slack.mode "socket" -}}{{- $_ := set $needed "slackAppToken" .Values.secrets.slackAppToken -}}{{- end -}}
{{- if eq .Values.slack.mode "http" -}}{{- $_ := set $needed "slackSigningSecret" .Values.secrets.slackSigningSecret -}}{{- end -}}
{{- range $key, $value := $needed -}}
{{- if not $value -}}
{{- fail (printf "blender-chat: secrets.%s is empty: the platforms turned on need it (or name a Secret holding it in secrets.existingSecret)" $key) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- range $name, $_ := .Values.env -}}
{{- if has $name (list "DISCORD_TOKEN" "SLACK_BOT_TOKEN" "SLACK_APP_TOKEN" "SLACK_SIGNING_SECRET" "WEB_API_TOKEN") -}}
{{- fail (printf "blender-chat: env.%s would put a credential in a ConfigMap: give it in secrets (or secrets.existingSecret), which only a Secret holds" $name) -}}
{{- end -}}
{{- if has $name (list "DATA_DIR" "HF_HOME" "HTTP_HOST" "HTTP_PORT" "SHUTDOWN_GRACE" "MEMORY_URL" "REDIS_URL" "BLENDERBOT_MODEL" "DISCORD_SHARD_COUNT" "DISCORD_SHARD_IDS" "DISCORD_SHARDS_PER_PROCESS" "DISCORD_PROCESS_INDEX" "WEB_ALLOWED_HOSTS") -}}
{{- fail (printf "blender-chat: env.%s is set by the chart from its values (redis, discord, model, shutdownGraceSeconds, web.allowedHosts): set those instead" $name) -}}
{{- end -}}
{{- end -}}
{{- if and .Values.ingress.enabled (not .Values.ingress.host) -}}
{{- fail "blender-chat: ingress.enabled needs ingress.host (the public name; Slack and the web chat's WEB_ALLOWED_HOSTS use it)" -}}
{{- end -}}
{{- end -}}

{{/* The pod's environment that is not in the ConfigMap: credentials and the pod index. */}}
{{- define "blender-chat.secretEnv" -}}
{{- $secret := include "blender-chat.secretName" . -}}
{{- $keys := list -}}
{{- if .Values.discord.enabled -}}{{- $keys = append $keys "DISCORD_TOKEN" -}}{{- end -}}
{{- if ne .Values.slack.mode "off" -}}{{- $keys = append $keys "SLACK_BOT_TOKEN" -}}{{- end -}}
{{- if eq .Values.slack.mode "socket" -}}{{- $keys = append $keys "SLACK_APP_TOKEN" -}}{{- end -}}
{{- if eq .Values.slack.mode "http" -}}{{- $keys = append $keys "SLACK_SIGNING_SECRET" -}}{{- end -}}
{{- range $keys }}
- name: {{ . }}
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ . }}
{{- end }}
{{- /* The web chat is on only when the Secret holds a token: optional. */}}
- name: WEB_API_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: WEB_API_TOKEN
      optional: true
{{- if .Values.redis.urlSecret.name }}
- name: MEMORY_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.urlSecret.name }}
      key: {{ .Values.redis.urlSecret.key }}
{{- end }}
{{- if include "blender-chat.sharded" . }}
{{- /* Pod i's shards: the bot turns its index into ids i*n .. i*n+n-1 (bot/config.py). */}}
- name: DISCORD_PROCESS_INDEX
  valueFrom:
    fieldRef:
      fieldPath: metadata.labels['apps.kubernetes.io/pod-index']
{{- end }}
{{- end -}}

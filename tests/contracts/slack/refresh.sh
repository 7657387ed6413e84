#!/usr/bin/env bash
# Download Slack's published contracts again (see README.md here): the OpenAPI document of the
# Web API and the java-slack-sdk samples the fake Slack is checked against. Tests never download;
# run this by hand where there is network, read `git diff`, then run the Slack tests.
#   tests/contracts/slack/refresh.sh [java-slack-sdk ref] [slack-api-specs ref]
# methods.json and docs-examples/ are read from docs.slack.dev by hand; this does not touch them.
set -euo pipefail

JAVA_REF="${1:-86ff7ca9915e21882def04c2d579ac02503f95fe}"
SPECS_REF="${2:-bc08db49625630e3585bf2f1322128ea04f2a7f3}"
HERE="$(cd "$(dirname "$0")" && pwd)"
RAW="${SLACK_CONTRACTS_RAW:-https://raw.githubusercontent.com}"  # another mirror, for testing the script

fetch() {  # fetch URL FILE: download to a temporary file, then replace FILE only if it worked
    curl --fail --silent --show-error --location "$1" -o "$2.part"
    mv "$2.part" "$2"
}

fetch "$RAW/slackapi/slack-api-specs/$SPECS_REF/web-api/slack_web_openapi_v2_without_examples.json" \
    "$HERE/slack_web_openapi_v2_without_examples.json"
fetch "$RAW/slackapi/slack-api-specs/$SPECS_REF/LICENSE" "$HERE/LICENSE-slack-api-specs"
fetch "$RAW/slackapi/java-slack-sdk/$JAVA_REF/LICENSE" "$HERE/LICENSE-java-slack-sdk"

SAMPLES="$RAW/slackapi/java-slack-sdk/$JAVA_REF/json-logs/samples"
for file in "$HERE"/java-slack-sdk-samples/api/*.json "$HERE"/java-slack-sdk-samples/events/*.json; do
    kind="$(basename "$(dirname "$file")")"
    fetch "$SAMPLES/$kind/$(basename "$file")" "$file"
done
for file in "$HERE"/java-slack-sdk-samples/api/*.json.gz; do  # kept gzipped: 2.6 MB each unpacked
    name="$(basename "$file" .gz)"
    fetch "$SAMPLES/api/$name" "$HERE/$name"
    gzip -9 -n -c "$HERE/$name" > "$file"
    rm "$HERE/$name"
done
fetch "$SAMPLES/app-backend/interactive-components/BlockActionPayload.json" \
    "$HERE/java-slack-sdk-samples/interactive-components/BlockActionPayload.json"

echo "Fetched java-slack-sdk@$JAVA_REF and slack-api-specs@$SPECS_REF. What changed:"
git -C "$HERE" diff --stat -- . || true

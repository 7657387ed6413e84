#!/usr/bin/env bash
# Refresh Discord's contracts in this folder (needs the network; the tests never download):
#   openapi.json, LICENSE   Discord's official OpenAPI 3.1 document of REST API v10 and its licence,
#                           from github.com/discord/discord-api-spec (specs/openapi.json) at SPEC_REF
#   gateway/*.json          JSON Schemas (draft-07) generated from the TypeScript types of the npm
#                           package discord-api-types with the npm package ts-json-schema-generator
#
# Usage: tests/contracts/discord/refresh.sh            (the pinned versions below)
#        SPEC_REF=main DAPI_VERSION=latest tests/contracts/discord/refresh.sh   (the newest)
#        tests/contracts/discord/refresh.sh --gateway-only   (only npm is reachable: keep openapi.json)
# Then run the Discord tests, fix what they find in the bot (not in the checks) and update the
# provenance table in README.md here (commit, date, versions).
# Needs curl, Node 20+ and npm. npm installs into a scratch directory outside the repository.
set -euo pipefail

SPEC_REF="${SPEC_REF:-74fda0fad044}"                       # discord/discord-api-spec commit (2026-07-18)
DAPI_VERSION="${DAPI_VERSION:-0.38.57}"                     # discord-api-types
GENERATOR_VERSION="${GENERATOR_VERSION:-2.10.0}"             # ts-json-schema-generator (brings its own TypeScript 5)

here="$(cd "$(dirname "$0")" && pwd)"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT

if [[ "${1:-}" != "--gateway-only" ]]; then
  raw="https://raw.githubusercontent.com/discord/discord-api-spec/$SPEC_REF"
  curl -fsSL "$raw/specs/openapi.json" -o "$scratch/openapi.json"
  curl -fsSL "$raw/LICENSE" -o "$scratch/LICENSE"
  python3 -c 'import json, sys; json.load(open(sys.argv[1]))' "$scratch/openapi.json"  # refuse a broken download
  mv "$scratch/openapi.json" "$scratch/LICENSE" "$here/"
fi

(cd "$scratch" && npm init -y >/dev/null \
  && npm install --no-audit --no-fund --silent "discord-api-types@$DAPI_VERSION" "ts-json-schema-generator@$GENERATOR_VERSION")
echo "discord-api-types $(node -p "require('$scratch/node_modules/discord-api-types/package.json').version")," \
     "ts-json-schema-generator $(node -p "require('$scratch/node_modules/ts-json-schema-generator/package.json').version")"

# file name -> the discord-api-types type it is generated from (all exported by v10.d.ts).
# What the fake sends on the gateway, and what the bot sends to it.
types=(
  hello:GatewayHello
  heartbeat_ack:GatewayHeartbeatAck
  invalid_session:GatewayInvalidSession
  ready:GatewayReadyDispatch
  resumed:GatewayResumedDispatch
  guild_create:GatewayGuildCreateDispatch
  message_create:GatewayMessageCreateDispatch
  message_update:GatewayMessageUpdateDispatch
  message_reaction_add:GatewayMessageReactionAddDispatch
  interaction_create:GatewayInteractionCreateDispatch
  chat_input_interaction:APIChatInputApplicationCommandInteraction
  message_command_interaction:APIMessageApplicationCommandInteraction
  identify:GatewayIdentify
  resume:GatewayResume
  heartbeat:GatewayHeartbeat
)
mkdir -p "$here/gateway"
rm -f "$here"/gateway/*.json
for entry in "${types[@]}"; do
  name="${entry%%:*}" type="${entry#*:}"
  # Defaults kept on purpose: additionalProperties false (a field the types lack is an error),
  # JSDoc "basic" (no descriptions: smaller files, same constraints).
  (cd "$scratch" && npx --no-install ts-json-schema-generator --path node_modules/discord-api-types/v10.d.ts \
      --type "$type" --jsDoc basic --no-type-check --out "$here/gateway/$name.json")
done
# ts-json-schema-generator resolves some types differently depending on the type it starts from:
# reached from GatewayMessageCreateDispatch, Pick<APIMessage, ...> (APIMessageSnapshotFields) keeps only
# APIMessageMentions' field. Such definitions are generated on their own and put in every file.
standalone=(APIMessageSnapshotFields)
for type in "${standalone[@]}"; do
  (cd "$scratch" && npx --no-install ts-json-schema-generator --path node_modules/discord-api-types/v10.d.ts \
      --type "$type" --jsDoc basic --no-type-check --out "$scratch/standalone-$type.json")
done

# Then, in every file:
# - a bit field (MessageFlags, UserFlags, ...) is typed as its enum, which the generator turns into "one
#   of the single bits"; Discord sends any combination, 0 included: each *Flags enum becomes a
#   non-negative integer;
# - the standalone definitions above replace the generated ones;
# - a definition must read the same in every file that has it, or the refresh fails naming it (add it
#   to `standalone`).
node - "$scratch" "$here"/gateway/*.json <<'JS'
const fs = require("fs");
const [scratch, ...files] = process.argv.slice(2);
const standalone = {};
for (const file of fs.readdirSync(scratch).filter((name) => name.startsWith("standalone-"))) {
  Object.assign(standalone, JSON.parse(fs.readFileSync(`${scratch}/${file}`, "utf8")).definitions);
}
const seen = {};
for (const file of files) {
  const schema = JSON.parse(fs.readFileSync(file, "utf8"));
  const definitions = schema.definitions ?? {};
  for (const [name, definition] of Object.entries(definitions)) {
    if (/Flags$/.test(name) && (definition.enum || definition.const !== undefined)) {
      definitions[name] = { type: "integer", minimum: 0, description: `bit field of ${name}` };
    } else if (name in standalone) {
      definitions[name] = standalone[name];
    }
    if (!name.includes("<")) (seen[name] ??= new Set()).add(JSON.stringify(definitions[name]));
  }
  fs.writeFileSync(file, JSON.stringify(schema, null, 2) + "\n");
}
const differing = Object.keys(seen).filter((name) => seen[name].size > 1);
if (differing.length) {
  console.error(`definitions that differ between files (add them to standalone): ${differing.join(", ")}`);
  process.exit(1);
}
JS
cp "$scratch/node_modules/discord-api-types/LICENSE" "$here/gateway/LICENSE"  # the schemas derive from its types
echo "refreshed $(ls "$here"/gateway/*.json | wc -l) gateway schemas"

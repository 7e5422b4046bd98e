# Sourced by benches/quick-ab.sh and benches/profile-router.sh: the request and rules they
# measure with. `fixture DIR` writes DIR/body.json (a 1 KB chat body), DIR/body.lua (wrk
# posting it) and DIR/rules/rules.yaml (one pool at 127.0.0.1:18101, the mock upstream;
# SmolLM2's tokenizer when models/ has it, and a token threshold no 1 KB prompt is near, so
# counting stays a bound from the byte length, as in benches/load.py).
fixture() {
  local dir=$1 model=""
  mkdir -p "$dir/rules"
  python3 -c 'import json,sys; open(sys.argv[1],"w").write(json.dumps({"model":"mock","max_tokens":64,"messages":[{"role":"user","content":"Tell me about tiered routing. "*30}]}))' "$dir/body.json"
  cat > "$dir/body.lua" <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local f = io.open("$dir/body.json", "r"); wrk.body = f:read("*a"); f:close()
LUA
  [ -f models/SmolLM2-135M-Instruct.Q4_1.gguf ] && model="models:
  mock:
    tokenizer: { gguf: $PWD/models/SmolLM2-135M-Instruct.Q4_1.gguf }
    context_window: 1048576"
  cat > "$dir/rules/rules.yaml" <<YAML
version: 1
$model
pools:
  mock: { class: cpu, capacity: on_demand, cost_per_hour: 0.2, workers: ["127.0.0.1:18101"] }
rules:
  - name: up-to-150k
    when: { context_tokens: { at_most: 150000 } }
    route: [mock]
  - name: all
    route: [mock]
YAML
}

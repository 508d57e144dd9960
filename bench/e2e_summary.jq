# Summarises bench/e2e.sh's raw records (slurped: one array of loadgen/memory objects) into
# medians, ranges and ratios. Called with --argjson facts and --argjson stats.

def order: ["direct", "brokerproxy", "brokerproxy-pipelined", "haproxy", "haproxy-splice", "socat",
             "brokerproxy-ssh-aes", "ssh-aes", "brokerproxy-ssh-chacha", "ssh-chacha",
             "brokerproxy-tls", "haproxy-tls"];

# The encrypted paths, each next to what users would otherwise run with the same cipher.
def pairs: [["brokerproxy-ssh-aes", "ssh-aes"], ["brokerproxy-ssh-chacha", "ssh-chacha"],
            ["brokerproxy-tls", "haproxy-tls"]];

# {median, min, max, n} of the non-null numbers, or null.
def stats:
  (map(select(. != null)) | sort) as $s
  | ($s | length) as $n
  | if $n == 0 then null
    else {median: (if $n % 2 == 1 then $s[(($n - 1) / 2) | floor]
                   else ($s[($n / 2) - 1] + $s[$n / 2]) / 2 end),
          min: $s[0], max: $s[-1], n: $n}
    end;

def med(f): (map(f) | stats | if . == null then null else .median end);

. as $runs
| ($runs | map(.peer) | unique) as $present
| [order[] | select(. as $p | $present | index($p))] as $peers
| [{config: "up x1", streams: 1, direction: "up"}, {config: "down x1", streams: 1, direction: "down"},
   {config: "up x8", streams: 8, direction: "up"}, {config: "down x8", streams: 8, direction: "down"}] as $cfgs
| ($runs | map(select(.mode == "throughput"))) as $tp
| ($runs | map(select(.mode == "handshake"))) as $hs
| {
    throughput: [$peers[] as $p | select($tp | any(.peer == $p)) | {
      peer: $p,
      configs: [$cfgs[] as $c
        | ($tp | map(select(.peer == $p and .streams == $c.streams and .direction == $c.direction))) as $r
        | ($r | map(select(.ok == true))) as $ok
        | $c + {
            runs: ($r | length), failed: (($r | length) - ($ok | length)),
            errors: ($r | map(select(.ok != true) | .errors)),
            gbit_per_s: ($ok | map(.gbit_per_s) | stats),
            peer_cpu_s_per_gib: ($ok | map(if .peer_cpu_s == null then null
                                            else .peer_cpu_s / (.total_bytes / 1073741824) end) | stats),
            # client (+ TLS client) + backend + peer: what the 2 shared cores had to do per GiB.
            all_cpu_s_per_gib: ($ok | map(((.peer_cpu_s // 0) + (.helper_cpu_s // 0)
                                           + (.backend_cpu_s // 0) + .client_cpu_s)
                                          / (.total_bytes / 1073741824)) | stats)
          }]
    }],
    handshake: [$peers[] as $p | {peer: $p} + ([[1, 32][] as $c
      | ($hs | map(select(.peer == $p and .concurrency == $c))) as $r
      | ($r | map(select(.ok == true))) as $ok
      | {("c" + ($c | tostring)): {
          runs: ($r | length), failed: (($r | length) - ($ok | length)),
          errors: ($r | map(select(.ok != true) | .errors)),
          conns_per_s: ($ok | map(.conns_per_s) | stats),
          p50_us: ($ok | map(.latency_us.p50) | stats),
          p99_us: ($ok | map(.latency_us.p99) | stats),
          p999_us: ($ok | map(.latency_us.p999) | stats),
          peer_cpu_us_per_conn: ($ok | map(if .peer_cpu_s == null then null
                                          else .peer_cpu_s * 1e6 / .connections end) | stats),
          all_cpu_us_per_conn: ($ok | map(((.peer_cpu_s // 0) + (.helper_cpu_s // 0)
                                           + (.backend_cpu_s // 0) + .client_cpu_s)
                                          * 1e6 / .connections) | stats)
        }}] | add)
    ],
    memory: ($runs | map(select(.mode == "memory"))),
    slowread: ($runs | map(select(.mode == "slowread-memory")))
  } as $s
| ($s.throughput | map({key: .peer, value: .configs}) | from_entries) as $tpm
| ($s.handshake | map({key: .peer, value: .}) | from_entries) as $hsm
| def tput(p; c): ($tpm[p] // [] | map(select(.config == c)) | .[0].gbit_per_s.median) // null;
  def pcpu(p; c): ($tpm[p] // [] | map(select(.config == c)) | .[0].peer_cpu_s_per_gib.median) // null;
  def ratio(a; b): if a == null or b == null or b == 0 then null else a / b end;
  $s + {
    ratios: {
      throughput_vs_direct: [$peers[] as $p | select($tpm[$p]) | {peer: $p} +
        ([$cfgs[].config as $c | {($c): ratio(tput($p; $c); tput("direct"; $c))}] | add)],
      brokerproxy_throughput_vs_peer: [$peers[] as $p | {peer: $p} +
        ([$cfgs[].config as $c | {($c): ratio(tput("brokerproxy"; $c); tput($p; $c))}] | add)],
      brokerproxy_conn_rate_vs_peer: [$peers[] as $p | {peer: $p,
        c1: ratio($hsm.brokerproxy.c1.conns_per_s.median; $hsm[$p].c1.conns_per_s.median),
        c32: ratio($hsm.brokerproxy.c32.conns_per_s.median; $hsm[$p].c32.conns_per_s.median)}],
      encrypted_paths: [pairs[] as [$a, $b] | select($present | index($a) and index($b)) | {peer: $a, vs: $b} +
        ([$cfgs[].config as $c | {($c): ratio(tput($a; $c); tput($b; $c))}] | add) +
        {c1: ratio($hsm[$a].c1.conns_per_s.median; $hsm[$b].c1.conns_per_s.median),
         c32: ratio($hsm[$a].c32.conns_per_s.median; $hsm[$b].c32.conns_per_s.median)}]
    },
    targets: (
      [$cfgs[].config as $c | ratio(tput("brokerproxy"; $c); tput("direct"; $c)) as $r
        | {target: "throughput \($c) >= 90% of direct", value: $r, unit: "ratio",
           pass: (if $r == null then null else $r >= 0.9 end)}]
      # Bytes per relay core: HAProxy's CPU per GiB over ours, the lowest of the four configurations.
      + [[$cfgs[].config as $c | ratio(pcpu("haproxy"; $c); pcpu("brokerproxy"; $c))] as $r
        | (if any($r[]; . == null) then null else ($r | min) end) as $v
        | {target: "bytes per relay core >= 2.5x HAProxy's, lowest of the four configurations",
           value: $v, unit: "ratio", pass: (if $v == null then null else $v >= 2.5 end)}]
      # Connection setup with the first bytes pipelined behind the preamble, as `connect` sends them.
      + [["c1", "c32"][] as $c
        | ratio($hsm["brokerproxy-pipelined"][$c].conns_per_s.median; $hsm.haproxy[$c].conns_per_s.median) as $r
        | {target: "connection rate \($c), pipelined, >= 1.3x HAProxy nbthread 1", value: $r, unit: "ratio",
           pass: (if $r == null then null else $r >= 1.3 end)}]
      + [($hsm["brokerproxy-pipelined"].c1.p50_us.median // null) as $b | ($hsm.haproxy.c1.p50_us.median // null) as $h
        | ($hsm.direct.c1.p50_us.median // null) as $d
        | (if $b == null or $d == null then null else $b - $d end) as $v
        | (if $h == null or $d == null then null else $h - $d end) as $hv
        | {target: "p50 added latency at concurrency 1, pipelined, <= HAProxy's (\($hv // "?" | if type == "number" then round else . end) us)",
           value: $v, unit: "us", pass: (if $v == null or $hv == null then null else $v <= $hv end)}]
      + [($hsm.brokerproxy.c1.p99_us.median // null) as $b | ($hsm.direct.c1.p99_us.median // null) as $d
        | (if $b == null or $d == null then null else $b - $d end) as $v
        | {target: "(for reference, no target) p99 added latency at concurrency 1", value: $v, unit: "us",
           pass: null}]
      + [pairs[0:2][] as [$a, $b] | select($present | index($a) and index($b))
        | [$cfgs[].config as $c | ratio(tput($a; $c); tput($b; $c))] as $r
        | (if any($r[]; . == null) then null else ($r | min) end) as $v
        | {target: "\($a) throughput >= \($b) (same cipher), lowest of the four configurations",
           value: $v, unit: "ratio", pass: (if $v == null then null else $v >= 1 end)}]
      + [select($present | index("brokerproxy-tls") and index("haproxy-tls"))
        | ([$cfgs[].config as $c | ratio(tput("brokerproxy-tls"; $c); tput("haproxy-tls"; $c))]) as $r
        | (if any($r[]; . == null) then null else ($r | min) end) as $v
        | {target: "TLS termination throughput >= 1.2x HAProxy's, lowest of the four configurations",
           value: $v, unit: "ratio", pass: (if $v == null then null else $v >= 1.2 end)}]
      + [select($present | index("brokerproxy-tls") and index("haproxy-tls")) | ["c1", "c32"][] as $c
        | ratio($hsm["brokerproxy-tls"][$c].conns_per_s.median; $hsm["haproxy-tls"][$c].conns_per_s.median) as $r
        | {target: "TLS handshakes/s \($c) >= 1.2x HAProxy's", value: $r, unit: "ratio",
           pass: (if $r == null then null else $r >= 1.2 end)}]
      + [($s.memory | map(select(.peer == "brokerproxy")) | min_by(.sessions)) as $m
        | ($m.rss_idle_kb // null) as $v
        | {target: "idle daemon RSS <= 8 MiB", value: (if $v == null then null else $v / 1024 end),
           unit: "MiB", pass: (if $v == null then null else $v <= 8192 end)}]
      + [($s.memory | map(select(.peer == "brokerproxy")) | max_by(.sessions)) as $m
        | {target: "daemon memory per idle session at \($m.sessions // "?") sessions <= 1 KiB (\($m.established // 0) established)",
           value: ($m.bytes_per_session // null), unit: "bytes",
           pass: (if $m.bytes_per_session == null then null else $m.bytes_per_session <= 1024 end)}]
    )
  }
| {facts: $facts, daemon_stats: $stats, summary: ., runs: $runs}

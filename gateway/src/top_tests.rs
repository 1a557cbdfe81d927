//! Tests of `tollgate top`: exposition parsing, per-agent totals and headroom, rates, the
//! rendered table and option validation.

use super::*;

const EXPOSITION: &str = r#"# HELP tollgate_llm_requests_total LLM calls
# TYPE tollgate_llm_requests_total counter
tollgate_llm_requests_total{agent="billing",model="gpt-4o",provider="openai",route="openai",status="200"} 10
tollgate_llm_requests_total{agent="billing",model="gpt-4o",provider="openai",route="openai",status="429"} 2
tollgate_llm_requests_total{agent="we\"ird\\name\n",model="m",provider="openai",route="r",status="200"} 1
# TYPE tollgate_llm_tokens_total counter
tollgate_llm_tokens_total{agent="billing",model="gpt-4o",provider="openai",route="openai",token_type="input"} 700
tollgate_llm_tokens_total{agent="billing",model="gpt-4o",provider="openai",route="openai",token_type="total"} 1000
# TYPE gen_ai_client_token_usage histogram
gen_ai_client_token_usage_bucket{agent="billing",le="1"} 0
gen_ai_client_token_usage_bucket{agent="billing",le="+Inf"} 12
gen_ai_client_token_usage_sum{agent="billing"} 1000
gen_ai_client_token_usage_count{agent="billing"} 12
tollgate_build_info{version="0.1.0"} 1 1700000000000
"#;

#[test]
fn parses_exposition_with_escapes_and_skips_histograms() {
    let samples = parse_exposition(EXPOSITION).unwrap();
    assert_eq!(samples.len(), 6, "{samples:#?}");
    assert!(samples.iter().all(|s| !s.name.starts_with("gen_ai_")));
    let weird = samples.iter().find(|s| s.label("model") == Some("m")).unwrap();
    assert_eq!(weird.label("agent"), Some("we\"ird\\name\n"));
    assert_eq!(weird.value, 1.0);
    let build = samples.iter().find(|s| s.name == "tollgate_build_info").unwrap();
    assert_eq!(build.labels, vec![("version".to_string(), "0.1.0".to_string())]);
}

#[test]
fn parse_edge_cases() {
    let s = parse_exposition("a_b:c 1.5e3\nx{ k = \"v,}\" , } NaN\ny{} +Inf\n").unwrap();
    assert_eq!(s[0].value, 1500.0);
    assert_eq!(s[1].label("k"), Some("v,}"));
    assert!(s[1].value.is_nan());
    assert_eq!(s[2].value, f64::INFINITY);
    for (bad, line) in
        [("ok 1\nx{a=\"1} 2", 2), ("x{a=1} 2", 1), ("x 1 2 3", 1), ("9x 1", 1), ("x{a=\"b\" c=\"d\"} 1", 1), ("x", 1)]
    {
        let e = parse_exposition(bad).unwrap_err();
        assert_eq!(e.line, line, "{bad:?}: {e}");
    }
}

fn snap(at: Instant, text: &str) -> Snapshot {
    Snapshot::from_samples(at, &parse_exposition(text).unwrap())
}

#[test]
fn totals_per_agent() {
    let s = snap(Instant::now(), EXPOSITION);
    let b = &s.agents["billing"];
    assert_eq!((b.requests, b.errors, b.tokens, b.cost_usd), (12.0, 2.0, 1000.0, None));
    let w = &s.agents["we\"ird\\name\n"];
    assert_eq!((w.requests, w.errors, w.tokens), (1.0, 0.0, 0.0));
    let with_cost = snap(
        Instant::now(),
        "tollgate_llm_cost_usd_total{agent=\"a\",model=\"x\"} 0.5\n\
         tollgate_llm_cost_usd_total{agent=\"a\",model=\"y\"} 0.25\n\
         tollgate_llm_requests_total{agent=\"a\",status=\"0\"} 3\n\
         tollgate_llm_requests_total{agent=\"a\",status=\"200\",error=\"timeout\"} 1\n",
    );
    let a = &with_cost.agents["a"];
    assert_eq!((a.requests, a.errors, a.cost_usd), (4.0, 4.0, Some(0.75)));
}

#[test]
fn rates_between_samples() {
    let t0 = Instant::now();
    let prev = snap(
        t0,
        "tollgate_llm_requests_total{agent=\"a\",status=\"200\"} 10\n\
         tollgate_llm_tokens_total{agent=\"a\",token_type=\"total\"} 1000\n\
         tollgate_llm_requests_total{agent=\"restarted\",status=\"200\"} 100\n",
    );
    let cur = snap(
        t0 + Duration::from_secs(2),
        "tollgate_llm_requests_total{agent=\"a\",status=\"200\"} 14\n\
         tollgate_llm_requests_total{agent=\"a\",status=\"500\"} 2\n\
         tollgate_llm_tokens_total{agent=\"a\",token_type=\"total\"} 1100\n\
         tollgate_llm_tokens_total{agent=\"a\",token_type=\"input\"} 99999\n\
         tollgate_llm_requests_total{agent=\"restarted\",status=\"200\"} 4\n\
         tollgate_llm_requests_total{agent=\"new\",status=\"200\"} 1\n\
         tollgate_llm_tokens_total{agent=\"new\",token_type=\"total\"} 400\n\
         tollgate_llm_cost_usd_total{agent=\"new\"} 0.02\n",
    );
    let rows = rates(&prev, &cur);
    let names: Vec<_> = rows.iter().map(|r| r.agent.as_str()).collect();
    assert_eq!(names, ["new", "a", "restarted"], "sorted by tokens/min");
    let a = &rows[1];
    assert_eq!((a.requests_per_s, a.tokens_per_min, a.errors_per_s), (3.0, 3000.0, 1.0));
    assert_eq!((a.cost_usd, a.cost_per_min), (None, None));
    let new = &rows[0];
    assert_eq!((new.requests_per_s, new.tokens_per_min), (0.5, 12000.0));
    assert_eq!(new.cost_usd, Some(0.02));
    assert!((new.cost_per_min.unwrap() - 0.6).abs() < 1e-9);
    assert_eq!(rows[2].requests_per_s, 2.0, "counter reset counts the new value");
}

#[test]
fn renders_aligned_table_with_totals() {
    let row = |agent: &str, req: f64, tok: f64, err: f64, cost: Option<(f64, f64)>, headroom: Option<f64>| Row {
        agent: agent.into(),
        requests_per_s: req,
        tokens_per_min: tok,
        errors_per_s: err,
        cost_usd: cost.map(|c| c.0),
        cost_per_min: cost.map(|c| c.1),
        headroom,
    };
    let rows = vec![
        row("billing", 3.0, 12345.0, 0.5, Some((1.5, 0.01)), Some(0.4299)),
        row("a-very-long-agent-name-from-a-cgroup-leaf.scope", 0.0, 0.0, 0.0, None, Some(0.0349)),
        row("cron", 0.0, 0.0, 0.0, None, None),
    ];
    let text = render("127.0.0.1:15000", Duration::from_secs(2), &rows);
    let expected = "\
tollgate top  127.0.0.1:15000  window 2s  3 agents

AGENT                             REQ/S  TOK/MIN  ERR/S  COST $   $/MIN  HEADROOM
billing                            3.00    12345   0.50    1.50  0.0100       42%
a-very-long-agent-name-from-a-c…      0        0      0       -       -      3.4%
cron                                  0        0      0       -       -         -
---------------------------------------------------------------------------------
TOTAL                              3.00    12345   0.50    1.50  0.0100      3.4%
";
    assert_eq!(text, expected, "\n{text}");
    let unlimited = render("h:1", Duration::from_secs(1), &[row("x", 1.0, 1.0, 0.0, None, None), rows[2].clone()]);
    assert!(unlimited.lines().last().is_some_and(|l| l.starts_with("TOTAL") && l.ends_with(" -")), "{unlimited}");
    let empty = render("h:1", Duration::from_millis(1500), &[]);
    assert!(empty.contains("window 1s 500ms  0 agents") && empty.contains("no LLM calls recorded yet"), "{empty}");
}

#[test]
fn headroom_is_the_tightest_limit_of_the_agent() {
    let t0 = Instant::now();
    let text = "\
# TYPE tollgate_ratelimit_remaining_ratio gauge
tollgate_ratelimit_remaining_ratio{agent=\"a\",count=\"total\",policy=\"per-agent\"} 0.75
tollgate_ratelimit_remaining_ratio{agent=\"a\",count=\"requests\",policy=\"team\"} 0.2
tollgate_ratelimit_remaining_ratio{agent=\"b\",count=\"total\",policy=\"per-agent\"} 1
tollgate_llm_requests_total{agent=\"a\",status=\"200\"} 4
tollgate_llm_requests_total{agent=\"c\",status=\"200\"} 1
";
    let cur = snap(t0 + Duration::from_secs(1), text);
    assert_eq!(cur.agents["a"].headroom, Some(0.2));
    assert_eq!(cur.agents["b"].headroom, Some(1.0), "an agent with a limit but no call in the view yet");
    assert_eq!(cur.agents["c"].headroom, None, "no limit covers c");
    // A gauge: the latest value counts, whatever the previous scrape said.
    let prev = snap(t0, &text.replace("} 0.2", "} 0.9"));
    let rows = rates(&prev, &cur);
    let get = |agent: &str| rows.iter().find(|r| r.agent == agent).and_then(|r| r.headroom);
    assert_eq!((get("a"), get("b"), get("c")), (Some(0.2), Some(1.0), None));
    assert_eq!(
        (percent(0.2), percent(0.999), percent(0.0999), percent(0.0)),
        ("20%".into(), "99%".into(), "9.9%".into(), "0.0%".into())
    );
}

#[test]
fn options_are_validated() {
    assert_eq!(parse_interval("2s").unwrap(), Duration::from_secs(2));
    assert_eq!(parse_interval("500ms").unwrap(), Duration::from_millis(500));
    assert_eq!(parse_interval("3").unwrap(), Duration::from_secs(3));
    for bad in ["0", "10ms", "-1", "soon", "inf"] {
        assert!(parse_interval(bad).is_err(), "{bad}");
    }
    assert_eq!(normalize_admin("http://127.0.0.1:15000/").unwrap(), "127.0.0.1:15000");
    assert_eq!(normalize_admin("[::1]:15000").unwrap(), "[::1]:15000");
    for bad in ["127.0.0.1", ":15000", "host:99999", "http://h:1/metrics"] {
        assert!(normalize_admin(bad).is_err(), "{bad}");
    }
}

#[test]
fn unreachable_admin_names_the_address() {
    // Bind then drop a listener: nothing listens on that port any more.
    let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let opts = Options { admin: addr.to_string(), interval: Duration::from_millis(100), once: true };
    let err = run(&opts).unwrap_err();
    assert!(matches!(err, TopError::Unreachable { .. }), "{err:?}");
    assert!(err.to_string().contains(&addr.to_string()), "{err}");
}

//! A reader for the Prometheus text exposition format (0.0.4) and its OpenMetrics variant, enough to
//! read engines' `/metrics`: samples with labels and values. Comments, `# EOF`, timestamps and
//! exemplars are ignored; a line that cannot be read is counted and skipped, never an error.

use std::borrow::Cow;

/// One sample: `name{label="value",...} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample<'a> {
    /// Metric name (with any `_total`, `_bucket`, ... suffix).
    pub name: &'a str,
    /// Labels in the order written.
    pub labels: Vec<(&'a str, Cow<'a, str>)>,
    /// The value (`NaN`, `+Inf` and `-Inf` included).
    pub value: f64,
}

impl Sample<'_> {
    /// The value of label `name`, if present.
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels.iter().find(|(k, _)| *k == name).map(|(_, v)| v.as_ref())
    }
}

/// Every sample of `text`, and how many lines could not be read.
pub fn parse(text: &str) -> (Vec<Sample<'_>>, usize) {
    let mut samples = Vec::new();
    let mut bad = 0;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match parse_line(line) {
            Some(sample) => samples.push(sample),
            None => bad += 1,
        }
    }
    (samples, bad)
}

fn parse_line(line: &str) -> Option<Sample<'_>> {
    let name_end =
        line.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':')).unwrap_or(line.len());
    let name = &line[..name_end];
    if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
        return None;
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(after) = rest.strip_prefix('{') {
        rest = parse_labels(after, &mut labels)?;
    }
    // The value is the first field; a timestamp or an exemplar (`# {...} v`) may follow.
    let value = rest.split_whitespace().next()?;
    Some(Sample { name, labels, value: parse_value(value)? })
}

/// Reads `k="v",...}` and returns what follows the closing brace.
fn parse_labels<'a>(mut rest: &'a str, labels: &mut Vec<(&'a str, Cow<'a, str>)>) -> Option<&'a str> {
    loop {
        rest = rest.trim_start();
        if let Some(after) = rest.strip_prefix('}') {
            return Some(after);
        }
        let eq = rest.find('=')?;
        let key = rest[..eq].trim();
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return None;
        }
        let after_eq = rest[eq + 1..].trim_start().strip_prefix('"')?;
        let (value, after_value) = parse_quoted(after_eq)?;
        labels.push((key, value));
        rest = after_value.trim_start();
        if let Some(after) = rest.strip_prefix(',') {
            rest = after;
        } else if !rest.starts_with('}') {
            return None;
        }
    }
}

/// Reads a label value up to its closing quote, unescaping `\\`, `\"` and `\n`.
fn parse_quoted(text: &str) -> Option<(Cow<'_, str>, &str)> {
    let mut escaped = false;
    let mut chars = text.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '\\' => {
                escaped = true;
                // The character after a backslash never ends the value.
                chars.next()?;
            }
            '"' => {
                let raw = &text[..i];
                let value = if escaped { Cow::Owned(unescape(raw)) } else { Cow::Borrowed(raw) };
                return Some((value, &text[i + 1..]));
            }
            _ => {}
        }
    }
    None
}

fn unescape(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    out
}

fn parse_value(text: &str) -> Option<f64> {
    match text {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => text.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_vllm_page() {
        let text = r#"# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
vllm:cache_config_info{block_size="16",cache_dtype="auto",num_gpu_blocks="2048",engine="0"} 1.0
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 1.2e+03
vllm:lora_requests_info{max_lora="1",running_lora_adapters="a,b",waiting_lora_adapters=""} 1.7e+09
vllm:e2e_request_latency_seconds_bucket{le="+Inf",model_name="m"} 5.0
"#;
        let (samples, bad) = parse(text);
        assert_eq!(bad, 0);
        assert_eq!(samples.len(), 6);
        assert_eq!(samples[0].name, "vllm:num_requests_running");
        assert_eq!(samples[0].label("engine"), Some("0"));
        assert_eq!(samples[0].value, 3.0);
        assert_eq!(samples[2].label("num_gpu_blocks"), Some("2048"));
        assert_eq!(samples[3].value, 1200.0);
        assert_eq!(samples[4].label("waiting_lora_adapters"), Some(""));
        assert_eq!(samples[5].label("le"), Some("+Inf"));
    }

    #[test]
    fn escapes_timestamps_exemplars_and_special_values() {
        let text = "a{x=\"q\\\"uote\\\\ \\nnl\",y = \"}\" } 1 1700000000000\n\
                    b NaN\nc +Inf\nd -Inf\n\
                    e_total{l=\"v\"} 2 # {trace_id=\"abc\"} 1.0\n# EOF\n";
        let (samples, bad) = parse(text);
        assert_eq!(bad, 0);
        assert_eq!(samples[0].label("x"), Some("q\"uote\\ \nnl"));
        assert_eq!(samples[0].label("y"), Some("}"));
        assert_eq!(samples[0].value, 1.0);
        assert!(samples[1].value.is_nan());
        assert_eq!(samples[2].value, f64::INFINITY);
        assert_eq!(samples[3].value, f64::NEG_INFINITY);
        assert_eq!((samples[4].name, samples[4].value), ("e_total", 2.0));
    }

    #[test]
    fn bad_lines_are_counted_not_fatal() {
        let text =
            "ok 1\n{x=\"1\"} 2\nno_value\nbad{x=\"unterminated} 3\nbad2{x=1} 4\n9name 1\nv abc\nok2 2\n";
        let (samples, bad) = parse(text);
        assert_eq!(samples.iter().map(|s| s.name).collect::<Vec<_>>(), vec!["ok", "ok2"]);
        assert_eq!(bad, 6);
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        for text in [
            "{",
            "a{",
            "a{b",
            "a{b=",
            "a{b=\"",
            "a{b=\"\\",
            "a{b=\"c\"",
            "a{b=\"c\",",
            "a 1e999999",
            "\u{feff}x 1",
        ] {
            let _ = parse(text);
        }
    }
}

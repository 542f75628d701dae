//! Realistic, deterministic sessions for the benchmarks (`pure`, `json`, `pipeline`,
//! `soak`), and the pure path run over them (parse, map) as the benchmarks time it.
//!
//! The mix: 5–15 mapped attributes (strings, arrays of options, numbers, booleans), about
//! 60% US (some with no `region`, i.e. the default region) and 40% EU, about 1% without an
//! email (skipped by design), 5% in the Jebbit webhook shape (identity = hash of the body),
//! 10% without `completed_at`, emails with stray case and white space.

use std::fmt::Write;
use std::hint::black_box;

use segment_bridge::events::{self, Mapped, Options};
use segment_bridge::session::Session;
use time::OffsetDateTime;

/// xorshift64*: small, fast, reproducible; no dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// True with probability `percent` / 100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

const QUESTIONS: &[&str] = &[
    "favorite_colors",
    "skin_type",
    "hair_concern",
    "age_range",
    "preferred_scent",
    "budget",
    "shopping_frequency",
    "outcome",
    "product_interest",
    "newsletter_topics",
    "household_size",
    "quiz_score",
    "first_purchase",
    "routine_steps",
    "climate",
    "loyalty_member",
    "referral_source",
    "gift",
];

const OPTIONS: &[&str] = &[
    "option 1",
    "option 2",
    "option 3",
    "option 4",
    "Dry & sensitive",
    "Oily",
    "Combination",
    "Under $25",
    "$25–$50",
    "Weekly",
    "Citrus and green notes",
    "example_outcome",
];

/// One generated message body.
pub struct Generated {
    pub body: String,
    /// Whether it produces events (has an email); the others are skipped and acknowledged.
    pub has_email: bool,
    pub eu: bool,
}

/// Session number `i` of a run tagged `run` (which keeps session ids unique across runs).
/// `sent_us`, when given, is stored as the attribute `bench_sent_us` (latency runs).
pub fn session(rng: &mut Rng, run: &str, i: u64, sent_us: Option<u64>) -> Generated {
    let eu = rng.chance(40);
    let has_email = !rng.chance(1);
    let webhook = rng.chance(5);
    let mut attrs = String::with_capacity(512);
    attrs.push('{');
    let n = 5 + rng.below(11) as usize;
    let start = rng.below(QUESTIONS.len() as u64) as usize;
    for k in 0..n {
        if k > 0 {
            attrs.push(',');
        }
        let q = QUESTIONS[(start + k) % QUESTIONS.len()];
        let _ = write!(attrs, "\"{q}_{}\":", k + 1);
        match rng.below(10) {
            0..=3 => {
                let _ = write!(
                    attrs,
                    "\"{}\"",
                    OPTIONS[rng.below(OPTIONS.len() as u64) as usize]
                );
            }
            4..=6 => {
                attrs.push('[');
                for j in 0..1 + rng.below(4) {
                    if j > 0 {
                        attrs.push(',');
                    }
                    let _ = write!(
                        attrs,
                        "\"{}\"",
                        OPTIONS[rng.below(OPTIONS.len() as u64) as usize]
                    );
                }
                attrs.push(']');
            }
            7 | 8 => {
                let _ = write!(attrs, "{}", 18 + rng.below(60));
            }
            _ => attrs.push_str(if rng.chance(50) { "true" } else { "false" }),
        }
    }
    if let Some(t) = sent_us {
        let _ = write!(attrs, ",\"bench_sent_us\":{t}");
    }
    attrs.push('}');

    let email = if has_email {
        let pad = if rng.chance(20) { "  " } else { "" };
        format!(
            "\"{pad}User.{i}.{}@Example.com{pad}\"",
            rng.below(1_000_000)
        )
    } else if rng.chance(50) {
        "null".to_owned()
    } else {
        "\"  \"".to_owned()
    };
    let opt_in = ["true", "\"true\"", "false", "\"false\""][rng.below(4) as usize];
    let region = if eu {
        "\"region\":\"eu\","
    } else {
        [
            "\"region\":\"us\",",
            "\"region\":\"US\",",
            "\"region\":\"non-eu\",",
            "",
        ][[0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3][rng.below(11) as usize]]
    };
    let campaign = rng.below(40);
    let completed = if rng.chance(90) {
        format!(
            "\"completed_at\":\"2026-03-{:02}T{:02}:{:02}:{:02}.{:03}Z\",",
            1 + rng.below(28),
            rng.below(24),
            rng.below(60),
            rng.below(60),
            rng.below(1000)
        )
    } else {
        String::new()
    };

    let mut body = String::with_capacity(attrs.len() + 400);
    if webhook {
        // The webhook's `data` holds email, opt-in and the answers; session keys beside it.
        let _ = write!(
            body,
            "{{\"campaign_id\":\"cmp{campaign:03}\",\"campaign_name\":\"Quiz {campaign}\",{region}{completed}\"data\":{{\"email\":{email},\"opt_in\":{opt_in},{}}},\"event\":{{\"event_number\":{i}}}}}",
            &attrs[1..attrs.len() - 1]
        );
    } else {
        let _ = write!(
            body,
            "{{\"session_id\":\"{run}-{i:08}-{:06x}\",\"campaign_id\":\"cmp{campaign:03}\",\"campaign_name\":\"Quiz {campaign}\",\"traffic_source\":\"Owned+Web\",{completed}{region}\"email\":{email},\"opt_in\":{opt_in},\"attributes\":{attrs}}}",
            rng.below(1 << 24)
        );
    }
    Generated {
        body,
        has_email,
        eu,
    }
}

/// `n` sessions of run `run`, generated from `seed`.
pub fn sessions(seed: u64, run: &str, n: u64) -> Vec<Generated> {
    let mut rng = Rng::new(seed);
    (0..n).map(|i| session(&mut rng, run, i, None)).collect()
}

/// The bodies of [`sessions`], as bytes: what a benchmark of the pure path reads.
pub fn bodies(seed: u64, run: &str, n: u64) -> Vec<Vec<u8>> {
    sessions(seed, run, n)
        .into_iter()
        .map(|g| g.body.into_bytes())
        .collect()
}

/// `Session::parse` of each body, as the worker does per delivery; every body must parse.
pub fn parse_each(bodies: &[Vec<u8>]) {
    for body in bodies {
        black_box(Session::parse(black_box(body)).expect("a valid session"));
    }
}

/// `Session::parse` then `events::map` (which serialises both events) of each body;
/// returns the bytes of the events written, so that nothing is optimised away.
pub fn map_each(bodies: &[Vec<u8>], now: OffsetDateTime, options: &Options) -> usize {
    let mut bytes = 0;
    for body in bodies {
        let session = Session::parse(black_box(body)).expect("a valid session");
        if let Mapped::Events(e) = events::map(&session, now, options).expect("maps") {
            bytes += e.len();
        }
    }
    black_box(bytes)
}

//! Stand-ins for the delivery state machine's tests (compiled only for them): a ticket
//! that records how and when it was settled, and a Segment whose answers are scripted and
//! which keeps what it was sent. With them, `Gather` and the senders run on paused tokio
//! time, without a broker or a network.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::settle::Settle;
use crate::batch::{Batch, Entry, Limits};
use crate::domain::Region;
use crate::events::SessionEvents;
use crate::segment::{Outcome, Post, Response};

/// How a fake ticket was settled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Settled {
    Acked,
    HandedBack,
    DeadLettered(&'static str),
    /// Dropped unsettled: what a lost link's deliveries come to. The live ticket's drop
    /// then neither publishes a copy nor acknowledges.
    Dropped,
}

/// What became of every ticket, and when.
#[derive(Clone, Default)]
pub(super) struct Ledger(Arc<Mutex<Vec<(u32, Settled, Instant)>>>);

impl Ledger {
    /// A link whose tickets report to this ledger.
    pub(super) fn link(&self) -> FakeLink {
        FakeLink {
            alive: Arc::new(AtomicBool::new(true)),
            ledger: self.clone(),
        }
    }

    /// How the ticket was settled and when; `None` while it is held.
    pub(super) fn of(&self, id: u32) -> Option<(Settled, Instant)> {
        let all = self.0.lock().unwrap();
        let mut found = all.iter().filter(|(i, ..)| *i == id);
        let first = found.next().map(|(_, s, at)| (s.clone(), *at));
        assert!(found.next().is_none(), "ticket {id} settled twice");
        first
    }

    /// The tickets settled this way, in id order.
    pub(super) fn ids(&self, how: &Settled) -> Vec<u32> {
        let mut ids: Vec<u32> = (self.0.lock().unwrap().iter())
            .filter(|(_, s, _)| s == how)
            .map(|(i, ..)| *i)
            .collect();
        ids.sort_unstable();
        ids
    }

    /// Every settlement so far, in id order.
    pub(super) fn all(&self) -> Vec<(u32, Settled)> {
        let mut all: Vec<_> = (self.0.lock().unwrap().iter())
            .map(|(i, s, _)| (*i, s.clone()))
            .collect();
        all.sort_unstable_by_key(|(i, _)| *i);
        all
    }

    fn record(&self, id: u32, how: Settled) {
        self.0.lock().unwrap().push((id, how, Instant::now()));
    }
}

/// A connection the fake tickets came on, which a test can lose.
pub(super) struct FakeLink {
    alive: Arc<AtomicBool>,
    ledger: Ledger,
}

impl FakeLink {
    /// A delivery received now.
    pub(super) fn ticket(&self, id: u32) -> FakeTicket {
        FakeTicket {
            id,
            received: Instant::now(),
            alive: self.alive.clone(),
            ledger: self.ledger.clone(),
            settled: false,
        }
    }

    /// A delivery received now, with its session's events (one session id per ticket).
    pub(super) fn entry(&self, id: u32, region: Region) -> Entry<FakeTicket> {
        Entry {
            ticket: self.ticket(id),
            events: events(id, region, 0),
        }
    }

    pub(super) fn mark_lost(&self) {
        self.alive.store(false, Ordering::Relaxed);
    }
}

/// A session's two events, whose Identify carries `id` (and `padding` bytes more).
pub(super) fn events(id: u32, region: Region, padding: usize) -> SessionEvents {
    let identify = format!(r#"{{"s":{id},"p":"{}"}}"#, "x".repeat(padding));
    SessionEvents::new(region, identify.as_bytes(), br#"{"t":1}"#)
}

/// Room for anything a test puts in one batch.
pub(super) const ROOMY: Limits = Limits {
    max_events: 2_500,
    max_bytes: 500_000,
};

/// One batch of these entries.
pub(super) fn batch(entries: impl IntoIterator<Item = Entry<FakeTicket>>) -> Batch<FakeTicket> {
    let mut batch = Batch::new(ROOMY);
    entries.into_iter().for_each(|e| batch.push(e));
    batch
}

/// The session ids of a batch, in order.
pub(super) fn ids(batch: &Batch<FakeTicket>) -> Vec<u32> {
    batch.entries().iter().map(|e| e.ticket.id).collect()
}

pub(super) struct FakeTicket {
    id: u32,
    received: Instant,
    alive: Arc<AtomicBool>,
    ledger: Ledger,
    settled: bool,
}

impl FakeTicket {
    fn settle(mut self, how: Settled) {
        self.settled = true;
        self.ledger.record(self.id, how);
    }
}

impl Drop for FakeTicket {
    fn drop(&mut self) {
        if !self.settled {
            self.ledger.record(self.id, Settled::Dropped);
        }
    }
}

impl Settle for FakeTicket {
    fn is_live(&self) -> bool {
        self.alive.load(Ordering::Relaxed)
    }

    fn received(&self) -> Instant {
        self.received
    }

    fn session_id(&self) -> String {
        self.id.to_string()
    }

    fn ack(self) {
        self.settle(Settled::Acked);
    }

    fn ack_all(tickets: impl IntoIterator<Item = Self>) {
        tickets.into_iter().for_each(Settle::ack);
    }

    fn hand_back(self) {
        self.settle(Settled::HandedBack);
    }

    fn dead_letter(self, _reason: String, code: &'static str) {
        self.settle(Settled::DeadLettered(code));
    }
}

/// One scripted answer: what Segment says, and after how long (`None`: never).
pub(super) struct Answer {
    pub(super) delay: Option<Duration>,
    pub(super) outcome: Outcome,
}

impl Answer {
    pub(super) fn at_once(outcome: Outcome) -> Answer {
        Answer {
            delay: Some(Duration::ZERO),
            outcome,
        }
    }

    pub(super) fn after(delay: Duration, outcome: Outcome) -> Answer {
        Answer {
            delay: Some(delay),
            outcome,
        }
    }

    pub(super) fn never() -> Answer {
        Answer {
            delay: None,
            outcome: Outcome::Accepted,
        }
    }
}

/// One request as Segment saw it.
#[derive(Debug, Clone)]
pub(super) struct Posted {
    pub(super) at: Instant,
    /// The session ids in the body, in order.
    pub(super) sessions: Vec<u32>,
}

type Script = Box<dyn FnMut(&[u32]) -> Answer + Send>;

/// A Segment that answers each request as its script says, given the request's session ids.
pub(super) struct Scripted {
    script: Mutex<Script>,
    posted: Mutex<Vec<Posted>>,
}

impl Scripted {
    pub(super) fn new(script: impl FnMut(&[u32]) -> Answer + Send + 'static) -> Scripted {
        Scripted {
            script: Mutex::new(Box::new(script)),
            posted: Mutex::new(Vec::new()),
        }
    }

    /// Answers in this order, then accepts everything at once.
    pub(super) fn answers(answers: impl IntoIterator<Item = Answer>) -> Scripted {
        let mut answers = answers.into_iter().collect::<Vec<_>>().into_iter();
        Scripted::new(move |_| {
            answers
                .next()
                .unwrap_or_else(|| Answer::at_once(Outcome::Accepted))
        })
    }

    pub(super) fn posted(&self) -> Vec<Posted> {
        self.posted.lock().unwrap().clone()
    }
}

impl Post for Scripted {
    fn post(&self, body: Vec<u8>) -> impl Future<Output = Response> + Send {
        let sessions = session_ids(&body);
        let answer = (self.script.lock().unwrap())(&sessions);
        self.posted.lock().unwrap().push(Posted {
            at: Instant::now(),
            sessions,
        });
        async move {
            match answer.delay {
                Some(delay) => tokio::time::sleep(delay).await,
                None => std::future::pending().await,
            }
            let status = match &answer.outcome {
                Outcome::Accepted => "200".to_owned(),
                Outcome::Retry { .. } => "503".to_owned(),
                Outcome::Rejected { status, .. } | Outcome::Misconfigured { status } => {
                    status.to_string()
                }
            };
            Response {
                status,
                outcome: answer.outcome,
                error: None,
            }
        }
    }
}

/// The session ids of a request body, from its Identify events.
fn session_ids(body: &[u8]) -> Vec<u32> {
    let body: serde_json::Value = serde_json::from_slice(body).expect("a JSON body");
    body["batch"]
        .as_array()
        .expect("a batch")
        .iter()
        .filter_map(|event| event["s"].as_u64())
        .map(|id| id as u32)
        .collect()
}

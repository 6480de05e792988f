//! The names one client connection waits for. Each name is asked of the
//! search relay (`relay::discovery`) once, however many requests of the
//! client wait for it; the session settles every waiter when the answer
//! comes, or at once when a limit refuses it.

use crate::relay::discovery::{Answer, Resolver};
use bytes::Bytes;
use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::net::IpAddr;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Waiters kept for one name under search, of every kind. A client repeats
/// a search until it is answered; distinct requests beyond this many for
/// one name are settled at once as not found.
const MAX_WAITERS_PER_NAME: usize = 64;

/// How long a waiter that wants a prompt answer (a PVA must-reply search)
/// waits before it is told "not found", while the name is still searched
/// for the others. A pvxs server answers a must-reply search at once even
/// when it has none of the names (pvxs `server.cpp`: `if(nreply==0 &&
/// !msg.mustReply) return;`), and clients wait for that answer. By then the
/// relay has sent the name six times (at 0, 20, 60, 140, 300 and 620 ms), so
/// a local server that has it has had every chance to answer.
pub const PROMPT_NOT_FOUND: Duration = Duration::from_secs(1);

/// A waiter for a name: something a session must do once the name's server
/// is known (or known to be absent). Equal waiters are one request repeated.
pub trait Waiter: Eq + Hash + Clone {
    /// Whether the client wants an answer even when the name is not found,
    /// without waiting for the whole search (see [`PROMPT_NOT_FOUND`]).
    fn wants_prompt_answer(&self) -> bool;
}

/// The names one client connection waits for, each asked of the relay once.
/// Adding, taking and expiring waiters cost constant time each.
pub struct Awaiting<W> {
    /// Each waiter with the time it is due a prompt "not found", if any.
    names: HashMap<Bytes, HashMap<W, Option<Instant>>>,
    /// Prompt answers due, in time order (the delay is constant). Entries
    /// whose waiter was answered meanwhile are skipped when they come up.
    prompts: VecDeque<(Instant, Bytes, W)>,
    /// Waiters in `names` that are due a prompt answer.
    live_prompts: usize,
    max_names: usize,
    /// The client's address, which the relay charges these searches to.
    client: IpAddr,
}

impl<W: Waiter> Awaiting<W> {
    pub fn new(max_names: usize, client: IpAddr) -> Self {
        Awaiting {
            names: HashMap::new(),
            prompts: VecDeque::new(),
            live_prompts: 0,
            max_names,
            client,
        }
    }

    /// Registers `waiter` for `name`, asking the relay when the name is new;
    /// a repeated request is kept once. Returns the waiter back when it
    /// cannot wait (the limits, or the relay is overloaded): the caller
    /// settles it as "not found" at once. The name is copied when kept, so
    /// it never holds on to the message it was cut from.
    pub fn add(
        &mut self,
        name: Bytes,
        waiter: W,
        resolver: &Resolver,
        answers: &mpsc::UnboundedSender<Answer>,
    ) -> Option<W> {
        let now = Instant::now();
        if let Some((key, waiters)) = self.names.get_key_value(&name) {
            if waiters.contains_key(&waiter) {
                return None;
            }
            if waiters.len() >= MAX_WAITERS_PER_NAME {
                return Some(waiter);
            }
            let key = key.clone();
            self.insert(key, waiter, now);
            return None;
        }
        if self.names.len() >= self.max_names {
            return Some(waiter);
        }
        let name = Bytes::copy_from_slice(&name);
        if resolver.lookup(name.clone(), self.client, answers).is_err() {
            return Some(waiter);
        }
        self.names.insert(name.clone(), HashMap::new());
        self.insert(name, waiter, now);
        None
    }

    fn insert(&mut self, name: Bytes, waiter: W, now: Instant) {
        let prompt = waiter.wants_prompt_answer().then(|| now + PROMPT_NOT_FOUND);
        if let Some(at) = prompt {
            self.compact_prompts();
            self.prompts.push_back((at, name.clone(), waiter.clone()));
            self.live_prompts += 1;
        }
        if let Some(waiters) = self.names.get_mut(&name) {
            waiters.insert(waiter, prompt);
        }
    }

    /// Drops queue entries of waiters answered meanwhile, once they are
    /// the majority, so the queue stays within twice the live waiters.
    fn compact_prompts(&mut self) {
        if self.prompts.len() <= 2 * self.live_prompts + MAX_WAITERS_PER_NAME {
            return;
        }
        let names = &self.names;
        self.prompts.retain(|(at, name, waiter)| {
            names
                .get(name)
                .and_then(|waiters| waiters.get(waiter))
                .is_some_and(|due| *due == Some(*at))
        });
    }

    /// Everything that waited for the answered name.
    pub fn take(&mut self, name: &Bytes) -> Vec<W> {
        let Some(waiters) = self.names.remove(name) else {
            return Vec::new();
        };
        self.live_prompts -= waiters.values().filter(|due| due.is_some()).count();
        waiters.into_keys().collect()
    }

    /// Completes when a waiter is due a prompt answer; never, if none is.
    /// Holds no borrow, so it can sit in a `select!` beside other branches.
    pub fn prompt_due(&self) -> impl std::future::Future<Output = ()> + 'static {
        sleep_until(self.prompts.front().map(|(at, _, _)| *at))
    }

    /// The waiters whose prompt answer is due by `now`, with their names:
    /// the caller settles them as "not found". The names stay under search
    /// for the other waiters.
    pub fn take_prompted(&mut self, now: Instant) -> Vec<(Bytes, W)> {
        let mut due = Vec::new();
        while let Some((at, _, _)) = self.prompts.front() {
            if *at > now {
                break;
            }
            let Some((at, name, waiter)) = self.prompts.pop_front() else {
                break;
            };
            let Some(waiters) = self.names.get_mut(&name) else {
                continue;
            };
            if waiters.get(&waiter) == Some(&Some(at)) {
                waiters.remove(&waiter);
                self.live_prompts -= 1;
                due.push((name, waiter));
            }
        }
        due
    }
}

/// Sleeps until `at`, or for ever without one.
pub async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::discovery::Request;
    use std::cell::Cell;
    use std::net::Ipv4Addr;

    thread_local! {
        /// Waiter comparisons made on this thread.
        static COMPARISONS: Cell<usize> = const { Cell::new(0) };
    }

    /// A waiter that counts how often it is compared.
    #[derive(Clone, Debug)]
    struct TestWaiter {
        id: u32,
        prompt: bool,
    }

    impl PartialEq for TestWaiter {
        fn eq(&self, other: &Self) -> bool {
            COMPARISONS.with(|c| c.set(c.get() + 1));
            self.id == other.id && self.prompt == other.prompt
        }
    }
    impl Eq for TestWaiter {}

    impl Hash for TestWaiter {
        fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
            self.id.hash(state);
            self.prompt.hash(state);
        }
    }

    impl Waiter for TestWaiter {
        fn wants_prompt_answer(&self) -> bool {
            self.prompt
        }
    }

    fn create(id: u32) -> TestWaiter {
        TestWaiter { id, prompt: false }
    }

    const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    /// A resolver whose requests the test reads itself.
    fn test_resolver() -> (Resolver, mpsc::Receiver<Request>) {
        Resolver::for_tests()
    }

    #[test]
    fn waiters_beyond_the_per_name_cap_are_refused_whatever_their_kind() {
        let (resolver, _requests) = test_resolver();
        let (answers, _) = mpsc::unbounded_channel();
        let mut awaiting = Awaiting::new(10, CLIENT);
        let name = Bytes::from_static(b"UNKNOWN");
        let refused = (0..60_000)
            .filter_map(|cid| awaiting.add(name.clone(), create(cid), &resolver, &answers))
            .count();
        assert_eq!(refused, 60_000 - MAX_WAITERS_PER_NAME);
        assert_eq!(awaiting.take(&name).len(), MAX_WAITERS_PER_NAME);
    }

    #[test]
    fn adding_a_waiter_compares_a_bounded_number_of_waiters() {
        let (resolver, _requests) = test_resolver();
        let (answers, _) = mpsc::unbounded_channel();
        let mut awaiting = Awaiting::new(10, CLIENT);
        let name = Bytes::from_static(b"UNKNOWN");
        COMPARISONS.with(|c| c.set(0));
        let adds = 60_000;
        for i in 0..adds {
            // Distinct creates up to the cap, then the same ones repeated.
            let cid = i % MAX_WAITERS_PER_NAME as u32;
            awaiting.add(name.clone(), create(cid), &resolver, &answers);
        }
        // A set compares a new waiter with the few that share its hash;
        // a list compares it with every waiter kept (64 per add here).
        let comparisons = COMPARISONS.with(Cell::get);
        assert!(
            comparisons <= 2 * adds as usize,
            "{comparisons} comparisons for {adds} adds"
        );
        assert_eq!(awaiting.take(&name).len(), MAX_WAITERS_PER_NAME);
    }

    #[test]
    fn a_stored_name_does_not_pin_the_message_it_came_in() {
        let (resolver, mut requests) = test_resolver();
        let (answers, _) = mpsc::unbounded_channel();
        let mut awaiting = Awaiting::new(10, CLIENT);
        // A large message, as a client may send, with a short name in it.
        let mut message = vec![0u8; 1 << 20];
        message[100..104].copy_from_slice(b"NAME");
        let message = Bytes::from(message);
        let name = message.slice_ref(&message[100..104]);
        assert!(awaiting.add(name, create(1), &resolver, &answers).is_none());
        // Both the session's copy and the relay's request hold the name;
        // neither may hold the message.
        assert!(message.is_unique());
        let Ok(Request::Lookup { name, .. }) = requests.try_recv() else {
            panic!("the relay was not asked");
        };
        assert_eq!(&name[..], b"NAME");
        assert_eq!(awaiting.take(&name).len(), 1);
    }

    #[test]
    fn a_prompt_waiter_is_told_not_found_while_others_keep_waiting() {
        let (resolver, mut requests) = test_resolver();
        let (answers, _) = mpsc::unbounded_channel();
        let mut awaiting = Awaiting::new(10, CLIENT);
        let name = Bytes::from_static(b"LATE");
        let must_reply = TestWaiter {
            id: 7,
            prompt: true,
        };
        awaiting.add(name.clone(), must_reply.clone(), &resolver, &answers);
        awaiting.add(name.clone(), create(8), &resolver, &answers);
        let now = Instant::now();
        assert!(awaiting.take_prompted(now).is_empty());
        let later = now + PROMPT_NOT_FOUND;
        assert_eq!(awaiting.take_prompted(later), [(name.clone(), must_reply)]);
        // The name is still under search for the create: the relay was
        // asked once, and a later answer reaches the create only.
        assert!(requests.try_recv().is_ok());
        assert!(requests.try_recv().is_err());
        assert_eq!(awaiting.take(&name), [create(8)]);
    }

    #[test]
    fn answered_prompt_waiters_do_not_pile_up_in_the_queue() {
        let (resolver, _requests) = test_resolver();
        let (answers, _) = mpsc::unbounded_channel();
        let mut awaiting = Awaiting::new(10, CLIENT);
        let name = Bytes::from_static(b"FOUND:AT:ONCE");
        for id in 0..100_000 {
            let waiter = TestWaiter { id, prompt: true };
            awaiting.add(name.clone(), waiter, &resolver, &answers);
            awaiting.take(&name);
        }
        assert!(awaiting.prompts.len() <= 2 * MAX_WAITERS_PER_NAME + 1);
    }
}

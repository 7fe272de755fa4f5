/*
 * apply.pml -- batchplan's apply protocol for one spec N, checked by spin over every interleaving.
 *
 * Read model/README.md first: it says what is modelled, maps every step below to the function
 * in reconciler/ that does it, and lists what is left out. The mutants (mutant_*.pml) define
 * one MUTANT_* switch and include this file; each must be refuted by spin.
 *
 *   spin -a apply.pml && gcc -O2 -o pan pan.c && ./pan        # expect "errors: 0"
 */

/* ---- sizes: SUM, ANY, PENDING and WAITED_BY below spell them out ---- */
#define NB      6    /* batch slots on the server: b0 plus every create the budgets allow (asserted) */
#define NP      2    /* creates in flight at once: sent, answer lost, not landed yet (asserted) */

/* ---- fault budgets: small, so that spin checks every interleaving in seconds. To try others:
   spin -DFAULTS=1 -a apply.pml. Keep FAULTS < ROUNDS: a run whose every send is lost gives up
   ("run apply again"), and the one run after quiet must not. ---- */
#ifndef ROUNDS
#define ROUNDS  3    /* CREATE_ROUNDS: sends of one create before apply gives up for this run */
#endif
#ifndef FAULTS
#define FAULTS  2    /* lost answers, delayed creates and spurious 404s, all appliers together */
#endif
#ifndef LATES
#define LATES   1    /* creates that land after the settling window (no client can close this);
                        only on one state file: see init */
#endif
#ifndef CRASHES
#define CRASHES 2    /* appliers killed (SIGKILL), at any step: a killed apply's re-run too */
#endif
#ifndef DONES
#define DONES   2    /* batches that complete while the appliers run (real ones take hours) */
#endif
#define MARGIN  8    /* the local-clock mutant's margin: more than the server clock moves in a run */
#define SKEW    10   /* how far the server clock may lag or lead the client's: more than MARGIN */

/* batch status; RUNNING stands for validating, in_progress and finalizing */
#define NONE      0  /* also: a read that answered 404 */
#define RUNNING   1
#define COMPLETED 2
#define CANCELLED 3

/* spec hashes: the batchplan_spec tag; every batch here has batchplan_name N */
#define H_OLD 1      /* the spec before its edit (the batch a replace must cancel) */
#define H     2      /* the spec both checkouts apply now */

/* creates in flight: sent, answer lost, not landed yet */
#define ORDINARY 1   /* lands (or is dropped) within the client timeout: settle waits for it */
#define LATE     2   /* lands at any time, even after the settling window */

#define LOST 255     /* create_batch's answer was lost: AmbiguousWrite */

#define SAME_CHECKOUT  0   /* the second applier is a re-run on the same state file (and lock) */
#define OTHER_CHECKOUT 1   /* the second applier is another checkout: its own state, no shared lock */

/* ---- the server ---- */
byte b_status[NB];      /* batch id i is slot i; ids grow with created_at (the list is newest first) */
byte b_hash[NB];
byte b_created[NB];     /* created_at, on the server's clock */
bool b_late[NB];        /* landed after its sender's settling window */
byte nb;                /* batches created so far */
byte clock;             /* the server's clock: ticks at every upload and batch it creates */
short skew;             /* the client's clock minus the server's: drawn when first read (see read_local_clock) */
bool skew_drawn;
bool upload_exists;     /* the spec's input, uploaded under its content hash */
byte upload_created;

byte p_kind[NP];        /* ORDINARY or LATE; 0 = free slot */
byte p_wait[NP];        /* appliers (bits) settling on it: it lands, or is dropped, before they look */
byte p_from[NP];        /* which applier sent it */
bool p_open[NP];        /* LATE: its sender's settling window has passed, so it may land now */

/* ---- the state files: one per checkout, written atomically (temp file + rename) ---- */
byte s_batch[2];        /* recorded batch id + 1; 0 = none */
byte s_hash[2];         /* the spec hash the recorded batch was made from */
byte s_intent[2];       /* the spec hash of a create's intent; 0 = none */
bool lock_held[2];      /* the OS file lock: released when its holder dies */

/* ---- budgets and bookkeeping ---- */
byte faults = FAULTS;
byte lates = LATES;
byte crashes = CRASHES;
byte dones = DONES;
byte config;
byte p1_bound;          /* appliers that may create at once: 1 on one state file, 2 on two */
byte done;              /* appliers finished or killed */
bool quiet;             /* every applier finished, every create landed, and one more apply ran */

/* ---- counting batches for the properties ---- */
#define ONE(c)         ((c) -> 1 : 0)
#define SUM(f)         (f(0) + f(1) + f(2) + f(3) + f(4) + f(5))
#define LIVE(i)        ONE(b_status[i] == RUNNING)
#define LIVE_NOW(i)    ONE(b_status[i] == RUNNING && b_hash[i] == H)
#define ORDINARY_NOW(i) ONE(b_status[i] == RUNNING && b_hash[i] == H && !b_late[i])
#define ANY(f)         (f(0) || f(1) || f(2) || f(3) || f(4) || f(5))
#define BATCH_NOW(i)   ((b_status[i] == RUNNING || b_status[i] == COMPLETED) && b_hash[i] == H)
#define PENDING        (p_kind[0] != 0 || p_kind[1] != 0)

/* the properties (README.md says what each means); each assert carries its name on its line */
#define P1_FEW_LIVE      (SUM(ORDINARY_NOW) <= p1_bound)
#define P2_ONE_LIVE      (SUM(LIVE) <= 1)
#define P3_HAS_BATCH     ANY(BATCH_NOW)      /* no `c -> 1 : 0` here: an LTL formula uses it too */
#define P4_NO_OLD_LIVE   (SUM(LIVE) == SUM(LIVE_NOW))
#define P5_STATE_NAMES(s) (s_batch[s] != 0 && s_hash[s] == H && b_status[s_batch[s] - 1] != CANCELLED)
#define WAITED_BY(m)   ((p_wait[0] | p_wait[1]) & (1 << (m)))

/* a kill: the process is gone, its in-memory plan with it; what it saved stays */
#define CRASH_POINT \
        if \
        :: may_crash && crashes > 0 -> crashes--; goto crashed \
        :: skip \
        fi

/* ---- server actions ---- */

inline new_batch(late) {
    assert(nb < NB);
    clock++;
    b_status[nb] = RUNNING; b_hash[nb] = H; b_created[nb] = clock; b_late[nb] = late;
    nb++;
    assert(P1_FEW_LIVE)     /* P1: only a new batch can break it, so checking here checks every step */
}

inline send_pending(kind) {
    k = 0;
    do
    :: k < NP && p_kind[k] != 0 -> k++
    :: else -> break
    od;
    assert(k < NP);    /* NP is large enough for the budgets */
    p_kind[k] = kind; p_from[k] = me; k = 0
}

/* The start of a settling window: every ORDINARY create in flight now lands (or is dropped)
   before it ends, and every LATE one this applier sent may land once it has ended. */
inline open_window() {
    d_step {
        k = 0;
        do
        :: k < NP -> if :: p_kind[k] == ORDINARY -> p_wait[k] = p_wait[k] | (1 << me) :: else fi; k++
        :: else -> k = 0; break
        od
    }
}

/* The end of this applier's settling window, or of the applier (killed or finished: the window
   then passes with no one watching): its LATE creates may land from now on. Landing earlier would
   make them ORDINARY ones. */
inline close_window() {
    d_step {
        k = 0;
        do
        :: k < NP -> if :: p_kind[k] == LATE && p_from[k] == me -> p_open[k] = true :: else fi; k++
        :: else -> k = 0; break
        od
    }
}

inline cancel_batch(id) {
    /* POST /batches/{id}/cancel: a finished batch stays as it is (409, taken as done) */
    d_step { if :: b_status[id] == RUNNING -> b_status[id] = CANCELLED :: else fi }
}

#define FREE(k)    p_kind[k] = 0; p_wait[k] = 0; p_from[k] = 0; p_open[k] = false
#define LAND(k) \
    :: d_step { p_kind[k] == ORDINARY || p_open[k] -> new_batch(p_kind[k] == LATE); FREE(k) }
#define DROP(k) \
    :: d_step { p_kind[k] == ORDINARY -> FREE(k) }
#define COMPLETE(i) \
    :: d_step { b_status[i] == RUNNING && dones > 0 -> dones--; b_status[i] = COMPLETED }

/* The server lands creates in flight (or drops one that never reached it) and completes running
   batches, in any order and at any time relative to the appliers. */
active proctype server() {
end_serve:
    do
    LAND(0)
    LAND(1)
    DROP(0)
    DROP(1)
    COMPLETE(0)
    COMPLETE(1)
    COMPLETE(2)
    COMPLETE(3)
    COMPLETE(4)
    COMPLETE(5)
    od
}

/* ---- the applier: one `batchplan apply` run; each inline is named after the code's function ---- */

/* find_batches (refresh's search; also look_for): list uploads; if the spec's input upload does
   not exist, no batch can exist for it. Else walk batches newest first and stop at the upload's
   created_at: two server timestamps. One atomic step: a listing is a snapshot. Results, as bit
   masks of batch ids tagged {N, H}: live_mask (running), done_mask (completed); and walk_sb, the
   status of the state's batch if the walk saw it. */
inline find_batches() {
#ifdef MUTANT_LOCAL_CLOCK
    read_local_clock();
#endif
    d_step {
        live_mask = 0; done_mask = 0; walk_sb = NONE;
        if
        :: upload_exists ->
#ifdef MUTANT_LOCAL_CLOCK
            floor = clock + skew - MARGIN;      /* local_now - margin, against the server's created_at */
#else
            floor = upload_created;
#endif
            i = nb;
            do
            :: i > 0 && b_created[i - 1] >= floor ->
                i--;
                if
                :: b_hash[i] == H && b_status[i] == RUNNING -> live_mask = live_mask | (1 << i)
                :: b_hash[i] == H && b_status[i] == COMPLETED -> done_mask = done_mask | (1 << i)
                :: else
                fi;
                if :: i + 1 == sb -> walk_sb = b_status[i] :: else fi
            :: else -> break
            od;
            i = 0; floor = 0
        :: else
        fi
    }
}

/* The client's clock may lag or lead the server's by more than any margin. The offset is drawn
   the first time something reads the local clock; the protocol never does, only the mutant. */
inline read_local_clock() {
    atomic {
        if
        :: !skew_drawn ->
            skew_drawn = true;
            if
            :: skew = 0
            :: skew = SKEW        /* the server clock lags the client's */
            :: skew = -SKEW       /* the server clock leads the client's */
            fi
        :: else
        fi
    }
}

/* look_for: the search for a create whose answer was lost (or that a killed apply may have sent);
   what it finds, running or completed, is adopted, and apply is done with this spec */
inline look_for() {
    find_batches();
    if
    :: live_mask != 0 || done_mask != 0 -> keep_oldest(); goto finished
    :: else
    fi
}

/* retrieve_batch: GET /batches/{id} of the recorded batch; the server may answer 404 for a batch
   that exists. A 404 is no proof of absence: get it again, then believe the walk; only a batch
   absent from both is gone (sb_status NONE). */
inline get_batch() {
    if
    :: faults > 0 -> faults--; sb_status = NONE
    :: sb_status = b_status[sb - 1]
    fi
}

inline retrieve_batch() {
    atomic { get_batch() };
#ifndef MUTANT_TRUST_404
    if
    :: sb_status == NONE -> atomic { get_batch() }; if :: sb_status == NONE -> sb_status = walk_sb :: else fi
    :: else
    fi
#endif
}

/* settle: wait the client timeout, which bounds when an ordinary lost create lands: every create
   sent before now that is still in flight has landed or was dropped. */
inline settle() {
#ifndef MUTANT_NO_SETTLE
    open_window();
#ifndef MUTANT_WAIT_FOR_LANDING
    !WAITED_BY(me);
#else
    !PENDING;       /* wait until every create in flight has landed, however long that takes */
#endif
    close_window()
#else
    skip
#endif
}

/* cancels_old: a replace records its new batch only once the old one is cancelled */
inline cancels_old() {
    if
    :: old_running -> cancel_batch(sb - 1); CRASH_POINT
    :: else
    fi
}

/* record a batch in the state: the replaced one is cancelled first (cancels_old) */
inline record_batch(id) {
#ifndef MUTANT_RECORD_BEFORE_CANCEL
    cancels_old();
    d_step { s_batch[st] = id + 1; s_hash[st] = H; s_intent[st] = 0 }
#else
    d_step { s_batch[st] = id + 1; s_hash[st] = H; s_intent[st] = 0 };
    CRASH_POINT;
    cancels_old()
#endif
}

/* adopt: record the keeper */
inline adopt() {
    record_batch(keeper)
}

/* cancel_duplicates (the net): cancel every live batch of this spec but the keeper */
inline cancel_duplicates() {
#ifndef MUTANT_NO_CANCEL_EXTRAS
    dups = live_mask & ~(1 << keeper);
    do
    :: dups != 0 ->
        d_step { i = 0; do :: dups & (1 << i) -> break :: else -> i++ od; dups = dups & ~(1 << i) };
        cancel_batch(i); i = 0;
        CRASH_POINT
    :: else -> break
    od
#else
    skip
#endif
}

/* keep the OLDEST live batch (server created_at, then id): a rule that depends only on what the
   server says, so two appliers with different states pick the same one. With none live, keep the
   oldest completed one. */
inline keep_oldest() {
    d_step {
        dups = (live_mask != 0 -> live_mask : done_mask);
        keeper = 0; do :: dups & (1 << keeper) -> break :: else -> keeper++ od;
        dups = 0
    };
    cancel_duplicates();
    if
    :: keeper + 1 != sb -> adopt()
    :: else
    fi
}

/* apply_plan for spec N: refresh, build_plan, then the Applier's steps.
   Kills: a CRASH_POINT follows every write (to the state file or the server) and the start. A kill
   between two reads is the same as a kill after the write before them: reads change nothing that
   outlives the process, and the other processes may take the same steps either way. */
proctype applier(byte me; byte st; bool may_crash; bool may_be_late) {
    byte sb, sh, si, sb_status, walk_sb, live_mask, done_mask, keeper, dups, got, round, i, k;
    short floor;
    bool old_running, state_done;

    atomic { !lock_held[st] -> lock_held[st] = true };
    CRASH_POINT;

refresh:
    d_step { sb = s_batch[st]; sh = s_hash[st]; si = s_intent[st] };
    find_batches();
    if
    :: sb != 0 -> retrieve_batch()
    :: else
    fi;

build_plan:
    d_step {
        if :: sb != 0 && sh == H && sb_status == RUNNING -> live_mask = live_mask | (1 << (sb - 1)) :: else fi;
        old_running = (sb != 0 && sh != H && sb_status == RUNNING);
        state_done = (sb != 0 && sh == H && sb_status == COMPLETED);
        sh = 0; sb_status = 0; walk_sb = 0      /* read by nothing below: keep the state vector small */
    };
    if
    :: live_mask != 0 || (done_mask != 0 && !state_done) -> keep_oldest(); goto finished   /* adopt */
    :: live_mask == 0 && state_done -> goto finished                                      /* noop */
    :: else                                                                               /* create */
    fi;

create:
record_intent:
    if
    :: si == H ->    /* an intent a killed apply left: its create may still be in flight */
        si = 0;
#ifndef MUTANT_NO_INTENT_WAIT
        settle();
        look_for()
#else
        skip
#endif
    :: else -> s_intent[st] = H; CRASH_POINT
    fi;

upload:              /* content-addressed: an upload with the same hash is reused */
    d_step { if :: !upload_exists -> clock++; upload_exists = true; upload_created = clock :: else fi };
    CRASH_POINT;

create_batch:        /* POST /batches */
    atomic {
        if
        :: new_batch(false); got = nb                                     /* answered */
        :: faults > 0 -> faults--; new_batch(false); got = LOST           /* made; the answer is lost */
        :: faults > 0 -> faults--; send_pending(ORDINARY); got = LOST     /* held past the client timeout */
        :: may_be_late && lates > 0 -> lates--; send_pending(LATE); got = LOST  /* held past settling too */
        fi
    };
    CRASH_POINT;
    if
    :: got != LOST -> goto record
    :: else
    fi;
    look_for();                                 /* AmbiguousWrite: the search, then settle and again */
    settle();
    look_for();
    round++;
    if
    :: round < ROUNDS -> goto create_batch
    :: else -> goto finished    /* failed for this run; the intent stays for the next */
    fi;

record:
    record_batch(got - 1);

finished:
crashed:
    close_window();
    d_step { lock_held[st] = false; done++ }
}

/* Two appliers run (a killed one and its re-run, or two checkouts), every create in flight lands,
   then ONE more apply runs with no kill and no late create: the system is quiet. */
init {
    byte last;
    atomic {
        if
        :: skip                              /* a new spec: nothing uploaded, nothing recorded */
        :: clock = 2; upload_exists = true; upload_created = 1;   /* an edited spec: replace b0 */
           b_status[0] = RUNNING; b_hash[0] = H_OLD; b_created[0] = 2; nb = 1;
           s_batch[0] = 1; s_hash[0] = H_OLD; s_batch[1] = 1; s_hash[1] = H_OLD
        fi;
        if
        :: config = SAME_CHECKOUT; p1_bound = 1
        :: config = OTHER_CHECKOUT; p1_bound = 2;
           lates = 0    /* both checkouts' creates already leave the net a duplicate; with a late
                           one too, spin needs 15 times the states */
        fi;
        run applier(1, 0, true, true);
        run applier(2, (config == SAME_CHECKOUT -> 0 : 1), true, true)
    };
    (done == 2 && !PENDING);
    if
    :: last = 0
    :: config == OTHER_CHECKOUT -> last = 1
    fi;
    run applier(3, last, false, false);
    (done == 3 && !PENDING);
    quiet = true;
    assert(P2_ONE_LIVE);                /* P2 */
    assert(P3_HAS_BATCH);               /* P3 */
    assert(P4_NO_OLD_LIVE);             /* P4 */
    assert(P5_STATE_NAMES(last))        /* P5 */
}

%% Distributed Erlang's message rate between two nodes on one machine: the reference
%% that opmesh's cross-node bench is compared with (scripts/bench-vs-erlang runs both in
%% the same run).
%%
%% The shape mirrors `opmesh bench --target ... --batch B --concurrency C` against a node
%% whose type is pinned to a second node: the sender keeps a window of W = B * C messages
%% in flight to a registered process on the other node, one Erlang message per operation
%% ({op, Seq, Payload}, a binary payload of the same size as opmesh's); the receiver
%% answers in batches of B, one message per batch. In `echo` mode a batch answer carries
%% every message's sequence number and payload back (as opmesh's reply batch carries every
%% operation's result); in `ack` mode only the count (a lower bound on the work per message:
%% the fastest distributed Erlang can go with this window).
%%
%%   erl -sname rx -setcookie C -noshell -pa DIR -run opmesh_peer receiver
%%   erl -sname tx -setcookie C -noshell -pa DIR -run opmesh_peer sender \
%%       rx@HOST Messages Window Batch PayloadBytes Warmup Mode
%%
%% The sender prints one line `erlang mode=... msgs=N seconds=S msgs_per_sec=R` and stops
%% both nodes. Every wait has a deadline: a peer that never answers ends the run with an
%% error, not a hang.
-module(opmesh_peer).
-export([receiver/0, sender/1]).

-define(DEADLINE_MS, 60000).

%% The receiving node: `sink` answers one sender at a time.
receiver() ->
    register(sink, self()),
    idle().

idle() ->
    receive
        {hello, From, Batch, Mode} ->
            From ! {ready, self()},
            serve(From, Batch, Mode, 0, []);
        stop ->
            halt(0)
    after ?DEADLINE_MS * 5 ->
        io:format(standard_error, "opmesh_peer receiver: no sender came~n", []),
        halt(1)
    end.

serve(From, Batch, Mode, N, Acc) ->
    receive
        {op, Seq, Payload} ->
            Acc1 = case Mode of
                echo -> [{Seq, Payload} | Acc];
                ack -> Acc
            end,
            case N + 1 of
                Batch ->
                    From ! {replies, Batch, Acc1},
                    serve(From, Batch, Mode, 0, []);
                N1 ->
                    serve(From, Batch, Mode, N1, Acc1)
            end;
        stop ->
            halt(0)
    after ?DEADLINE_MS ->
        io:format(standard_error, "opmesh_peer receiver: the sender went quiet~n", []),
        halt(1)
    end.

%% The sending node.
sender([RxNode, MsgsS, WindowS, BatchS, BytesS, WarmupS, ModeS]) ->
    Rx = list_to_atom(RxNode),
    Batch = max(1, list_to_integer(BatchS)),
    %% Whole batches only: the receiver answers every Batch messages.
    Msgs = round_up(list_to_integer(MsgsS), Batch),
    Warmup = round_up(list_to_integer(WarmupS), Batch),
    Window = round_up(max(list_to_integer(WindowS), Batch), Batch),
    Payload = binary:copy(<<"x">>, list_to_integer(BytesS)),
    Mode = list_to_atom(ModeS),
    ok = connect(Rx, 100),
    {sink, Rx} ! {hello, self(), Batch, Mode},
    Sink = receive
        {ready, P} -> P
    after ?DEADLINE_MS -> fail("the receiver did not answer hello")
    end,
    run(Sink, Warmup, Window, Payload),
    T0 = erlang:monotonic_time(microsecond),
    run(Sink, Msgs, Window, Payload),
    T1 = erlang:monotonic_time(microsecond),
    Seconds = (T1 - T0) / 1.0e6,
    io:format("erlang mode=~s msgs=~b window=~b batch=~b payload_bytes=~b seconds=~.3f msgs_per_sec=~b~n",
              [Mode, Msgs, Window, Batch, byte_size(Payload), Seconds, round(Msgs / Seconds)]),
    Sink ! stop,
    %% Let the stop message leave before this node goes.
    timer:sleep(100),
    halt(0).

round_up(N, B) -> ((max(N, 0) + B - 1) div B) * B.

connect(_Rx, 0) -> fail("cannot reach the receiving node");
connect(Rx, Tries) ->
    case net_adm:ping(Rx) of
        pong ->
            %% The receiver registers `sink` as it starts: wait for it.
            wait_registered(Rx, 100);
        pang ->
            timer:sleep(100),
            connect(Rx, Tries - 1)
    end.

wait_registered(_Rx, 0) -> fail("the receiving node has no `sink`");
wait_registered(Rx, Tries) ->
    case rpc:call(Rx, erlang, whereis, [sink]) of
        P when is_pid(P) -> ok;
        _ ->
            timer:sleep(100),
            wait_registered(Rx, Tries - 1)
    end.

%% Sends Total messages keeping Window in flight; returns when every one is answered.
run(_Sink, 0, _Window, _Payload) -> ok;
run(Sink, Total, Window, Payload) ->
    First = min(Window, Total),
    send(Sink, 0, First, Payload),
    await(Sink, First, 0, Total, Payload).

send(_Sink, _From, 0, _Payload) -> ok;
send(Sink, Seq, N, Payload) ->
    Sink ! {op, Seq, Payload},
    send(Sink, Seq + 1, N - 1, Payload).

await(_Sink, _Sent, Total, Total, _Payload) -> ok;
await(Sink, Sent, Done, Total, Payload) ->
    receive
        {replies, N, _Echoed} ->
            More = min(N, Total - Sent),
            send(Sink, Sent, More, Payload),
            await(Sink, Sent + More, Done + N, Total, Payload)
    after ?DEADLINE_MS ->
        fail("no answer from the receiver")
    end.

fail(Why) ->
    io:format(standard_error, "opmesh_peer sender: ~s~n", [Why]),
    halt(1).

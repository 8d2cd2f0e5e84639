-- case.child_withdrawn, case.school_enrolled and case.closed no longer publish `on`, the day the
-- agency confirmed it (no consumer reads it; shared/events.py, _CaseOutcome): intake keeps it
-- with the case's history instead, shown to those who may read the case.
alter table case_events add column confirmed_on date;

-- Events recorded before this change had the date only in the envelope they published: copy it
-- from the outbox (rows the retention job has not archived yet) ...
update case_events e set confirmed_on = (o.envelope #>> '{data,on}')::date
  from outbox o
 where o.event_id = e.event_id
   and o.event_type in ('case.child_withdrawn', 'case.school_enrolled', 'case.closed')
   and o.envelope #>> '{data,on}' is not null;

-- ... and take it out of the outbox, the event log `make run` replays into an empty broker, so a
-- replay does not publish it again (the field is optional on read: older records still parse).
update outbox set envelope = envelope #- '{data,on}'
 where event_type in ('case.child_withdrawn', 'case.school_enrolled', 'case.closed')
   and envelope -> 'data' ? 'on';

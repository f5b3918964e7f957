// TransactionLog
